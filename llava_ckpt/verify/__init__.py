"""`verify`: run converted weights in the reference MindSpore model and compare with transformers, layer by
layer, on the same image and prompt.

  inputs.py     the processor's inputs (image, chat template, tokens) and eos ids, as llava_ckpt.prompts builds them
  converted.py  the converted weights: one folder or rank_<r>/ folders reassembled by their split kinds
  hf_side.py    transformers' own modules, one at a time, weights read lazily from the source safetensors
  ms_side.py    the reference model's own cells, one at a time, weights read lazily from the converted files
  streamed.py   the walk: both sides module by module, prefill then greedy decoding with KV caches
  compare.py    tolerances; logits, module and greedy comparisons
  drift.py      numeric drift: the diverging module again on transformers' input, compute dtype vs float64
  proof.py      the weight proof: every tensor back through its op's inverse, bit for bit against its source
  report.py     the human-readable report
  ranks.py      the job a tp output's msrun ranks run (runtime/msrun.py launches them) and its handlers
  record.py     the verification record: files hashed meanwhile, verification.json written from the result
  run.py        orchestration (proof, msrun ranks, the walk, the drift rerun, the result dict)
"""
from .compare import TOLERANCES
from .inputs import DEFAULT_IMAGE, DEFAULT_PROMPT
from .report import format_report
from .run import verify

__all__ = ["verify", "format_report", "TOLERANCES", "DEFAULT_IMAGE", "DEFAULT_PROMPT"]

"""Reference MindSpore LLaVA-1.5 with the converted (MindFormers LlavaVlm) parameter names.

It exists to run converted checkpoints: check them against transformers (`llava_ckpt.verify`) and answer
questions (`llava_ckpt.generate`); it is not a training model. Usage: `model, _ = build_and_load(cfg, tensors)`,
then `Runner(model).generate(...)` (one prompt, greedy) or `.generate_batch(...)` (left-padded batches, greedy
or `sampling.sampler(...)`).
"""
from .llava import LlavaVlm, Runner, trace_names
from .loading import build_and_load, detect_fused, ignored_names, load_weights, set_device

__all__ = ["LlavaVlm", "Runner", "trace_names", "build_and_load", "detect_fused", "ignored_names",
           "load_weights", "set_device"]

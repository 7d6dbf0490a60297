"""Files: validated readers, streaming writers, and the one home of each file concept.

  readers.py    validated lazy readers of safetensors and MindSpore .ckpt (headers and record indexes, pread)
  writers.py    streaming writers (.ckpt byte-identical to ms.save_checkpoint, safetensors), hashing as they write
  hf_folder.py  a Hugging Face checkpoint folder: its weight files, index and side files, checked
  ranks.py      rank folders: the one scan that finds them, tensors cut across ranks read as one
  manifest.py   manifest.json: read, written, and an output's tp and format
  verification.py  verification.json: what verify proved (written by verify, read by check), and whether it still applies
  output.py     the one output transaction (staging folder, free space, hashing, side files, manifest, publish)
  strategy.py   MindSpore's ParallelStrategyMap files
  paths.py      path containment: whether a path stays inside a folder
  files.py      sha256, fsync, atomic small files, bounded JSON reads
  dtypes.py     the dtypes a checkpoint holds, by their safetensors, MindSpore and numpy names, and the one cast
  protobuf.py   the bits of the protobuf wire format .ckpt and strategy files need
  load.py       `load_tensors`, the lazy public reader
"""
from .load import load_tensors

__all__ = ["load_tensors"]

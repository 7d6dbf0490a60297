"""Reading and writing tensor files: validated lazy sources, streaming writers, atomic outputs."""
from .load import load_tensors

__all__ = ["load_tensors"]

"""`load_tensors`: a lazy read-only mapping over a .ckpt, a .safetensors file or a converted folder."""
from __future__ import annotations

import os
from collections.abc import Mapping

from ..errors import fail
from .source import FileReader, read_index


class LazyTensors(Mapping):
    """name -> numpy array, read from disk on access (one tensor in memory at a time)."""

    def __init__(self, infos: dict):
        self.infos = infos
        self._reader = FileReader()

    def __getitem__(self, name):
        return self._reader.read(self.infos[name])

    def __iter__(self):
        return iter(self.infos)

    def __len__(self):
        return len(self.infos)

    def close(self):
        self._reader.close()


def weights_file(path: str) -> str:
    """The weight file of a converted folder (llava.ckpt or llava.safetensors), or `path` itself."""
    if os.path.isdir(path):
        for name in ("llava.ckpt", "llava.safetensors"):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise fail(f"no llava.ckpt or llava.safetensors in {path}")
    if not os.path.isfile(path):
        raise fail(f"{path} does not exist")
    if not path.endswith((".ckpt", ".safetensors")):
        raise fail(f"{path}: expected a .ckpt or .safetensors file")
    return path


def load_tensors(path: str) -> LazyTensors:
    """Open weights lazily: nothing but the headers / record index is read until a tensor is asked for."""
    return LazyTensors(read_index(weights_file(path)))

"""`load_tensors`: a lazy read-only mapping over a .ckpt, a .safetensors file or a converted folder."""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from ..errors import fail
from .paths import inside
from .ranks import weights_name
from .readers import FileReader, read_index


class LazyTensors(Mapping):
    """name -> numpy array, read from disk on access (one tensor in memory at a time)."""

    def __init__(self, infos: dict):
        self.infos = infos
        self._reader = FileReader()

    def __getitem__(self, name):
        return self._reader.read(self.infos[name])

    def mapped(self, name) -> np.ndarray | None:
        """A copy-on-write file map of the tensor, no bytes read (None where its file holds it in pieces)."""
        return self._reader.mapped(self.infos[name])

    def __iter__(self):
        return iter(self.infos)

    def __len__(self):
        return len(self.infos)

    def close(self):
        self._reader.close()


def weights_file(path: str) -> str:
    """The weights file of a tp-1 output folder (llava.ckpt or llava.safetensors, which must resolve inside it),
    or `path` itself when it is a weights file."""
    if os.path.isdir(path):
        for fmt in ("ckpt", "safetensors"):
            if os.path.lexists(os.path.join(path, weights_name(fmt))):
                candidate = os.path.join(path, weights_name(fmt))
                if os.path.isfile(inside(path, weights_name(fmt), candidate)):
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

"""Mapped tensors (llava_ckpt/io/readers.py FileReader.mapped): the same values as a read, from .safetensors and
.ckpt, nothing written back to the file, and no map where a tensor's bytes are not one run."""
import dataclasses
import hashlib

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from llava_ckpt.io import load_tensors
from llava_ckpt.io.readers import FileReader, read_index
from llava_ckpt.io.writers import open_writer


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def tensors():
    rng = np.random.default_rng(0)
    return {"a.weight": rng.standard_normal((7, 5)).astype(np.float16),
            "b.weight": rng.standard_normal((3, 9)).astype(ml_dtypes.bfloat16),
            "c.bias": rng.standard_normal(4).astype(np.float32)}


def test_a_mapped_safetensors_tensor_equals_its_read_and_leaves_the_file_alone(tmp_path, tensors):
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path)
    before = _digest(path)
    lazy = load_tensors(path)
    for name, want in tensors.items():
        view = lazy.mapped(name)
        assert view is not None and view.dtype == want.dtype and view.shape == want.shape
        assert np.array_equal(view.view(np.uint8), want.view(np.uint8)) and np.array_equal(view, lazy[name])
        view[...] = 0  # copy-on-write: this process's pages, not the file's
    lazy.close()
    assert _digest(path) == before
    assert np.array_equal(load_tensors(path)["a.weight"], tensors["a.weight"])


def test_a_mapped_ckpt_tensor_equals_its_read(tmp_path, tensors):
    path = str(tmp_path / "w.ckpt")
    specs = [(n, v.shape, {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[str(v.dtype)])
             for n, v in tensors.items()]
    w = open_writer(path, "ckpt", specs)
    for (n, shape, code), v in zip(specs, tensors.values()):
        w.begin(n, shape, code, v.nbytes)
        w.write(v.tobytes())
        w.end()
    w.close()
    lazy = load_tensors(path)
    for name, want in tensors.items():
        assert np.array_equal(lazy.mapped(name).view(np.uint8), want.view(np.uint8))


def test_no_map_when_the_bytes_are_in_pieces(tmp_path, tensors):
    """A .ckpt tensor over 512 MiB is several records: the reader joins them, a map cannot."""
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path)
    info = read_index(path)["a.weight"]
    offset, length = info.pieces[0]
    split = dataclasses.replace(info, pieces=((offset, length // 2), (offset + length // 2, length - length // 2)))
    assert FileReader.mapped(split) is None
    with FileReader() as reader:
        assert np.array_equal(reader.read(split), tensors["a.weight"])  # the read still joins them

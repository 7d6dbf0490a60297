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


def _resident_kib(view) -> int:
    """Rss of the mapping holding `view`'s first byte, from /proc/self/smaps."""
    address, rss, inside = view.ctypes.data, None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                rss = int(line.split()[1])
    return rss


def test_populate_fills_a_maps_pages_without_changing_them(tmp_path):
    """A model computing from its maps has them populated at load (FileReader.populate): the pages are this
    map's (resident) before anything reads them, and the values are the file's."""
    from llava_ckpt.io.readers import FileReader
    want = np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float16)  # 2 MiB
    path = str(tmp_path / "w.safetensors")
    save_file({"w": want}, path)
    view = load_tensors(path).mapped("w")
    before = _resident_kib(view)
    FileReader.populate(view)
    after = _resident_kib(view)
    assert before < 1024 <= after  # (a map is untouched until read: fault-around alone maps 64 KiB at most)
    assert np.array_equal(view, want)


def test_kept_maps_give_the_same_values_and_are_released(tmp_path, tensors):
    """FileReader(keep_maps=True) (verify's transformers side): views of one map per file, equal to a read,
    the file untouched; release_maps drops the maps while views of them live on."""
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path)
    before = _digest(path)
    infos, reader = read_index(path), FileReader(keep_maps=True)
    views = {n: reader.mapped(infos[n]) for n in tensors}
    assert len(reader._maps) == 1  # one map for the file's three tensors
    for name, want in tensors.items():
        assert views[name].dtype == want.dtype and np.array_equal(views[name].view(np.uint8), want.view(np.uint8))
    reader.release_maps()
    assert not reader._maps and np.array_equal(views["a.weight"], tensors["a.weight"])
    reader.close()
    assert _digest(path) == before


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
    assert FileReader().mapped(split) is None and FileReader(keep_maps=True).mapped(split) is None
    with FileReader() as reader:
        assert np.array_equal(reader.read(split), tensors["a.weight"])  # the read still joins them

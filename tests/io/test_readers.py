"""Mapped tensors (llava_ckpt/io/readers.py FileReader.mapped): the same values as a read, from .safetensors and
.ckpt, nothing written back to the file, and no map where a tensor's bytes are not one run."""
import dataclasses
import hashlib
import os
import time

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


def _cached_fraction(path: str) -> float:
    """How much of a file the page cache holds (mincore over a map of it)."""
    import ctypes
    import mmap
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        view = np.frombuffer(m, np.uint8)
        assert ctypes.CDLL("libc.so.6").mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec) == 0
        del view
        return float((np.frombuffer(vec, np.uint8) & 1).mean())


def test_prefetch_brings_a_whole_tensor_into_the_page_cache(tmp_path):
    """FileReader.prefetch (the walks' read of the next layer while one runs): all of a 48 MiB tensor is cached
    once it is done, not only the first readahead window (one WILLNEED call for the whole range read 8 MB)."""
    want = np.random.default_rng(0).standard_normal((6144, 4096)).astype(np.float16)
    path = str(tmp_path / "w.safetensors")
    save_file({"w": want}, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages, which DONTNEED can drop
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert _cached_fraction(path) < 0.1
        reader = FileReader()
        reader.prefetch([read_index(path)["w"]])
        reader.close()  # waits for the prefetch
        deadline = time.monotonic() + 10  # the reads it queued complete on their own
        while _cached_fraction(path) < 0.99 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _cached_fraction(path) >= 0.99
    finally:
        os.close(fd)
    assert np.array_equal(load_tensors(path)["w"], want)


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
    assert FileReader().mapped(split) is None
    with FileReader() as reader:
        assert np.array_equal(reader.read(split), tensors["a.weight"])  # the read still joins them

"""Validated, lazy access to tensors in safetensors and MindSpore .ckpt files.

Nothing is trusted: header lengths, JSON, dtypes, offsets and overlaps are checked against the file
before any data is read, so a hostile file gives one clear error instead of a huge allocation or a crash.
Data is read with pread into fresh buffers (bounded by the rows asked for), so memory stays flat and
no file stays mapped.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass, field

import numpy as np

from ..errors import fail
from .dtypes import DTYPES, BY_MS, OTHER_BY_MS, OTHER_DTYPES, itemsize, numpy_dtype
from .protobuf import fields, read_varint

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: `pieces` are (file offset, length) runs, in order."""
    name: str
    dtype: str            # safetensors code: F16, BF16, F32
    shape: tuple
    path: str
    pieces: tuple = field(default=())

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.pieces)

    @property
    def row_bytes(self) -> int:
        """Bytes per row along dim 0 (a 0-d or 1-d tensor has rows of one element)."""
        per = itemsize(self.dtype)
        for d in self.shape[1:]:
            per *= d
        return per

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _regular_file(path: str) -> None:
    """Refuse FIFOs, devices and folders before opening them (opening a FIFO blocks; /dev/zero never ends)."""
    if not os.path.isfile(path):
        raise fail(f"{path} is not a regular file" if os.path.exists(path) else f"{path} does not exist")


def read_safetensors_header(path: str, other_dtypes: bool = False) -> dict:
    """name -> TensorInfo for one .safetensors file; raises CheckpointError on anything malformed.
    `other_dtypes`: also index tensors of io.dtypes.OTHER_DTYPES (training counters) instead of refusing them."""
    _regular_file(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise fail(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n > size - 8:
            raise fail(f"{path}: safetensors header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"{path}: safetensors header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise fail(f"{path}: safetensors header is not a JSON object")
    base = 8 + n
    data_size = size - base
    tensors = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise fail(f"{path}: header entry {name!r} is not an object")
        dtype = entry.get("dtype")
        if dtype not in DTYPES and not (other_dtypes and dtype in OTHER_DTYPES):
            raise fail(f"{path}: tensor {name!r} has unsupported dtype {dtype!r} (F16, BF16 and F32 are supported)")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                     for d in shape)):
            raise fail(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise fail(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        start, end = offsets
        if not 0 <= start <= end or end > data_size:
            raise fail(f"{path}: tensor {name!r} data_offsets {offsets} are out of bounds "
                       f"(data section is {data_size} bytes; truncated file?)")
        if end - start != _prod(shape) * itemsize(dtype):
            raise fail(f"{path}: tensor {name!r} data_offsets {offsets} do not match shape {shape} and {dtype}")
        spans.append((start, end, name))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, ((base + start, end - start),))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise fail(f"{path}: tensors {n0!r} and {n1!r} overlap in the data section")
    return tensors


# ---- MindSpore .ckpt: concatenated protobuf Checkpoint messages (the format save_checkpoint writes) ---------

def _ckpt_value(buf, span):
    """(tag, dims, tensor_type, content span) of one Checkpoint.Value."""
    tag, dims, ttype, content = None, [], None, None
    for fnum, fwire, fval in fields(buf, *span):
        if fnum == 1 and fwire == 2:
            tag = bytes(buf[fval[0]:fval[1]]).decode("utf-8")
        elif fnum == 2 and fwire == 2:
            for tnum, twire, tval in fields(buf, *fval):
                if tnum == 1 and twire == 0:
                    dims.append(tval)
                elif tnum == 1 and twire == 2:  # packed dims
                    p, q = tval
                    while p < q:
                        d, p = read_varint(buf, p, q)
                        dims.append(d)
                elif tnum == 2 and twire == 2:
                    ttype = bytes(buf[tval[0]:tval[1]]).decode("ascii")
                elif tnum == 3 and twire == 2:
                    content = tval
        else:
            raise ValueError(f"unsupported Checkpoint.Value field {fnum}")
    if tag is None or ttype is None or content is None:
        raise ValueError("record without tag, type or content")
    return tag, tuple(dims), ttype, content


def read_ckpt_index(path: str, other_dtypes: bool = False) -> dict:
    """name -> TensorInfo for a MindSpore .ckpt, by walking its records over mmap (no data is copied).

    Concatenated Checkpoint messages parse as one message: a run of `value` (field 1) entries; a tensor
    over 512 MiB is several entries with the same tag, joined here as pieces. `other_dtypes`: also index
    tensors of io.dtypes.OTHER_DTYPES (a training checkpoint's global_step is Int32) instead of refusing them.
    """
    types = dict(BY_MS, **OTHER_BY_MS) if other_dtypes else BY_MS
    _regular_file(path)
    size = os.path.getsize(path)
    if size == 0:
        raise fail(f"{path}: empty .ckpt file")
    tensors: dict = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        end = size - 17 if size >= 17 and buf[size - 17:size - 10] == b"crc_num" else size
        try:
            for vnum, vwire, vspan in fields(buf, 0, end):
                if vnum != 1 or vwire != 2:
                    raise ValueError("not a Checkpoint.value record")
                tag, dims, ttype, content = _ckpt_value(buf, vspan)
                if ttype not in types:
                    raise fail(f"{path}: tensor {tag!r} has unsupported type {ttype!r}")
                piece = (content[0], content[1] - content[0])
                old = tensors.get(tag)
                if old is None:
                    tensors[tag] = TensorInfo(tag, types[ttype], dims, path, (piece,))
                elif old.shape == dims and old.dtype == types[ttype]:
                    tensors[tag] = TensorInfo(tag, old.dtype, dims, path, old.pieces + (piece,))
                else:
                    raise ValueError(f"tensor {tag!r} split into records of different shapes")
        except (ValueError, UnicodeDecodeError) as exc:
            raise fail(f"{path}: not a valid MindSpore .ckpt ({exc})") from None
    for info in tensors.values():
        need = _prod(info.shape) * itemsize(info.dtype)
        if info.nbytes != need:
            raise fail(f"{path}: tensor {info.name!r} holds {info.nbytes} bytes, its shape needs {need}")
    return tensors


def read_index(path: str, other_dtypes: bool = False) -> dict:
    """name -> TensorInfo for a .safetensors or .ckpt file (`other_dtypes`: see read_ckpt_index)."""
    if path.endswith(".ckpt"):
        return read_ckpt_index(path, other_dtypes)
    return read_safetensors_header(path, other_dtypes)


# ---- reading data ---------------------------------------------------------------------------------------

READAHEAD_CHUNK = 8 << 20  # bytes per POSIX_FADV_WILLNEED call: the readahead window it is capped to


def _advise_willneed(ranges) -> None:
    try:
        for fd, offset, length in ranges:
            for start in range(offset, offset + length, READAHEAD_CHUNK):
                os.posix_fadvise(fd, start, min(READAHEAD_CHUNK, offset + length - start), os.POSIX_FADV_WILLNEED)
    except OSError:  # advice only: a file system that refuses it is read when used
        pass


class FileReader:
    """Keeps one fd per file open and reads byte ranges of tensors with pread (GIL released)."""

    def __init__(self):
        self._fds: dict = {}
        self._prefetching: threading.Thread | None = None

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_bytes(self, info: TensorInfo, start: int, stop: int, out=None) -> memoryview:
        """Bytes [start, stop) of the tensor's data, across its pieces, into `out` (a new buffer if None)."""
        need = stop - start
        buf = np.empty(need, dtype=np.uint8) if out is None else out  # no zero-fill: every byte is read
        view = memoryview(buf)
        fd = self._fd(info.path)
        pos = 0
        skip = start
        for offset, length in info.pieces:
            if skip >= length:
                skip -= length
                continue
            take = min(length - skip, need - pos)
            got = os.preadv(fd, [view[pos:pos + take]], offset + skip)
            while got < take:
                more = os.preadv(fd, [view[pos + got:pos + take]], offset + skip + got)
                if more <= 0:
                    raise fail(f"{info.path}: unexpected end of file reading {info.name!r} (truncated?)")
                got += more
            pos += take
            skip = 0
            if pos == need:
                break
        return view

    def prefetch(self, infos) -> None:
        """Have these tensors' bytes read into the page cache now, while the caller computes (a layer-by-layer
        walk reads the next layer while it runs this one), so a later read or map finds them there.
        POSIX_FADV_WILLNEED reads at most the device's readahead window per call (8 MB here: one call for a
        400 MB range brought in 2% of it, measured), so each range is asked for in READAHEAD_CHUNK pieces, on a
        helper thread: queueing a 7B layer's reads blocks the caller ~0.1 s. One prefetch at a time."""
        if not hasattr(os, "posix_fadvise"):
            return
        ranges = [(self._fd(info.path), offset, length) for info in infos for offset, length in info.pieces]
        self._join_prefetch()
        if ranges:
            self._prefetching = threading.Thread(target=_advise_willneed, args=(ranges,), daemon=True)
            self._prefetching.start()

    def _join_prefetch(self) -> None:
        if self._prefetching is not None:
            self._prefetching.join()
            self._prefetching = None

    def read_rows(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along dim 0 as a fresh numpy array in the stored dtype."""
        rb = info.row_bytes
        data = self.read_bytes(info, start * rb, stop * rb)
        arr = np.frombuffer(data, dtype=numpy_dtype(info.dtype))
        rest = info.shape[1:] if info.shape else ()
        return arr.reshape((stop - start,) + tuple(rest)) if info.shape else arr.reshape(())

    def read(self, info: TensorInfo) -> np.ndarray:
        return self.read_rows(info, 0, info.rows).reshape(info.shape)

    def mapped(self, info: TensorInfo) -> np.ndarray | None:
        """The tensor as a copy-on-write map of its file (None when its bytes are not one run): its pages are
        the page cache's, read on first touch and never counted as this process's own (anonymous) memory, so
        a model can compute from a 14 GB checkpoint without holding 14 GB of its own. Nothing is written back."""
        if len(info.pieces) != 1 or not info.shape:
            return None
        offset, length = info.pieces[0]
        if length != info.nbytes or length == 0:
            return None
        view = np.memmap(info.path, dtype=numpy_dtype(info.dtype), mode="c", offset=offset, shape=info.shape)
        mapping = getattr(view, "_mmap", None)
        if mapping is not None and hasattr(mmap, "MADV_WILLNEED"):
            mapping.madvise(mmap.MADV_WILLNEED)  # read ahead now, while loading, not at the first matmul
        return view

    @staticmethod
    def populate(view) -> None:
        """Fill the page tables of a map from `mapped` now (MADV_POPULATE_READ, Linux 5.14+; elsewhere nothing):
        a model's first pass over its weights otherwise faults them in a page run at a time. For loading a model
        that computes from its maps (generate: 14.1 GB of the 7B's cached pages in ~1 s at load, and its first
        bfloat16 prefill ~0.5 s shorter, median of 5 alternating runs), never for a one-pass read (it blocks
        until every page is read: verify's proof lost its overlap with the hashing that way)."""
        mapping = getattr(view, "_mmap", None)
        if mapping is not None:
            try:
                mapping.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))
            except OSError:  # an older kernel: the pages fault in as they are used
                pass

    def close(self):
        self._join_prefetch()  # its fds stay open until it is done
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

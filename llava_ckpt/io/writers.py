"""Streaming writers for MindSpore .ckpt and safetensors: header, then data as it arrives.

Each writer hashes exactly the bytes it writes (sha256 for the manifest) as they are handed over, while a
background thread writes the previous chunks, so hashing overlaps the writes instead of costing an extra pass.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading

from .dtypes import ms_type
from .protobuf import bytes_field, ints_field, key, varint

CKPT_SLICE = 512 * 1024 * 1024  # MindSpore splits tensor data into records of at most 512 MiB


def ckpt_record_header(name: str, shape, code: str, content_len: int) -> bytes:
    """Bytes of one Checkpoint record up to (not including) its tensor_content, as protobuf would write them.

    Checkpoint{value=1: Value{tag=1, tensor=2: TensorProto{dims=1 (unpacked), tensor_type=2, tensor_content=3}}}
    """
    tensor_head = (ints_field(1, (int(d) for d in shape)) + bytes_field(2, ms_type(code).encode())
                   + key(3, 2) + varint(content_len))
    tensor_len = len(tensor_head) + content_len
    value_head = bytes_field(1, name.encode("utf-8")) + key(2, 2) + varint(tensor_len)
    value_len = len(value_head) + tensor_len
    return key(1, 2) + varint(value_len) + value_head + tensor_head


class _Sink:
    """A file written by a background thread, fed through a small bounded queue, hashed as it is fed."""

    def __init__(self, path: str, depth: int = 4):
        self.path = path
        self._f = open(path, "wb", buffering=0)
        self._hash = hashlib.sha256()
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error = None
        self.bytes_written = 0
        self._thread = threading.Thread(target=self._run, name=f"write {os.path.basename(path)}", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None:
                continue
            try:
                view = memoryview(item).cast("B")
                while view:
                    n = self._f.write(view)
                    view = view[n:]
            except BaseException as exc:  # reported on the next put/close, naming the file
                if isinstance(exc, OSError) and exc.filename is None:
                    exc.filename = self.path
                self._error = exc

    def put(self, data) -> None:
        """Hash here (the caller's thread), write on the sink's thread: the two overlap on two cores."""
        if self._error is not None:
            raise self._error
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.bytes_written += view.nbytes
        self._q.put(view)

    def close(self) -> str:
        """Drain, fsync, close; return the sha256 of everything written."""
        self._q.put(None)
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            os.fsync(self._f.fileno())
        finally:
            self._f.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._q.put(None)
        self._thread.join()
        self._f.close()


class CkptWriter:
    """MindSpore .ckpt, byte-identical to ms.save_checkpoint of the same tensors in the same order."""

    def __init__(self, path: str):
        self._sink = _Sink(path)
        self._cur = None

    def begin(self, name: str, shape, code: str, nbytes: int) -> None:
        self._cur = [name, tuple(shape), code, nbytes, 0]  # name, shape, dtype, total, written
        if nbytes == 0:
            return
        self._sink.put(ckpt_record_header(name, shape, code, min(nbytes, CKPT_SLICE)))

    def write(self, data) -> None:
        name, shape, code, total, done = self._cur
        view = memoryview(data).cast("B")
        while view:
            room = CKPT_SLICE - done % CKPT_SLICE
            if done and done % CKPT_SLICE == 0:  # a new record for the next 512 MiB
                self._sink.put(ckpt_record_header(name, shape, code, min(total - done, CKPT_SLICE)))
            take = min(room, len(view))
            self._sink.put(view[:take])
            done += take
            view = view[take:]
        self._cur[4] = done

    def end(self) -> None:
        name, _, _, total, done = self._cur
        if done != total:
            raise RuntimeError(f"{name}: wrote {done} bytes, expected {total}")
        self._cur = None

    def close(self) -> str:
        return self._sink.close()

    def abort(self) -> None:
        self._sink.abort()


def safetensors_header(specs, metadata=None) -> bytes:
    """Header for tensors in `specs` [(name, shape, code)], laid out in that order; padded to 8 bytes."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    from .dtypes import itemsize
    for name, shape, code in specs:
        n = itemsize(code)
        for d in shape:
            n *= d
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """safetensors with the data in the order given up front (the format allows any order)."""

    def __init__(self, path: str, specs, metadata=None):
        self._order = [name for name, _, _ in specs]
        self._next = 0
        self._sink = _Sink(path)
        self._sink.put(safetensors_header(specs, metadata or {"format": "ms"}))
        self._cur = None

    def begin(self, name: str, shape, code: str, nbytes: int) -> None:
        expected = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"safetensors writer expected {expected!r}, got {name!r}")
        self._next += 1
        self._cur = [name, nbytes, 0]

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self._cur[2] += len(view)
        self._sink.put(view)

    def end(self) -> None:
        name, total, done = self._cur
        if done != total:
            raise RuntimeError(f"{name}: wrote {done} bytes, expected {total}")

    def close(self) -> str:
        if self._next != len(self._order):
            raise RuntimeError(f"safetensors writer closed after {self._next} of {len(self._order)} tensors")
        return self._sink.close()

    def abort(self) -> None:
        self._sink.abort()


def open_writer(path: str, fmt: str, specs):
    """A writer for `fmt` ('ckpt' | 'safetensors'); specs = [(name, shape, code)] in write order."""
    return CkptWriter(path) if fmt == "ckpt" else SafetensorsWriter(path, specs)

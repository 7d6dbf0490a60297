"""Streaming writers for MindSpore .ckpt and safetensors: header, then data as it arrives.

Each writer hashes exactly the bytes it writes (sha256 for the manifest) as they arrive, while a thread per
file writes the previous blocks, so hashing overlaps the I/O instead of costing an extra pass.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import queue
import struct
import threading

from .dtypes import ms_type
from .protobuf import bytes_field, ints_field, key, varint

CKPT_SLICE = 512 * 1024 * 1024
FILE_MODE = 0o666  # less the umask, as every tool's output files  # MindSpore splits tensor data into records of at most 512 MiB


def host_memory() -> int:
    """This host's physical memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def ckpt_load_warning(what: str, nbytes: int, memory: int | None = None) -> str | None:
    """Why MindSpore itself will not load a .ckpt of `nbytes` on this host, or None.

    MindSpore 2.10's load_checkpoint reads a .ckpt into memory whole (one protobuf message), then refuses it
    unless the memory still free (os.sysconf SC_AVPHYS_PAGES: the page cache counts as used) exceeds its size,
    and parses it into a second copy: a file read from disk needs about 3x its size free. Measured on a 23.5 GiB
    host right after convert (4.7 - 9.3 GiB free): the 7B's 13.2 GiB .ckpt, its tp-2 and tp-4 rank files were
    all refused, 2 of 8 tp-8 rank files (2.1 GiB) loaded, the rest were refused as the page cache filled. So a
    .ckpt above an eighth of the host's memory is refused there (smaller ones load only while memory is free);
    safetensors loads at any size (memory-mapped: 0.1 s and 0.16 GiB for all 13.2 GiB)."""
    memory = host_memory() if memory is None else memory
    if nbytes <= memory / 8:
        return None
    return (f"{what} is a {nbytes / 2**30:.1f} GiB .ckpt: MindSpore's load_checkpoint reads a .ckpt whole and then "
            f"refuses it unless the free memory left (page cache not counted) still exceeds its size, about 3x its "
            f"size free in all, which this host ({memory / 2**30:.0f} GiB) has only when nearly idle; safetensors "
            f"(--format safetensors, the default) loads at any size")


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


BLOCK = 8 << 20     # bytes handed from the caller to the writer thread at a time
BLOCKS = 3          # blocks per file in flight (memory: BLOCK * BLOCKS per output file)
ALIGN = 4096        # O_DIRECT wants block-aligned memory, offsets and sizes


class _Sink:
    """One output file. The caller's bytes land in page-aligned blocks (read straight into them, or copied) and
    are hashed there by the caller; a thread per file writes each full block with O_DIRECT (DMA from the
    block: no copy into the page cache, which costs more CPU here than the sha256), so the disk's write time
    overlaps the caller's reading and hashing of the next blocks.
    Where O_DIRECT is refused (tmpfs, some network filesystems) it falls back to ordinary writes."""

    def __init__(self, path: str):
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), FILE_MODE)
            self._direct = hasattr(os, "O_DIRECT")
        except OSError:
            self._fd = os.open(path, flags, FILE_MODE)
            self._direct = False
        self._hash = hashlib.sha256()
        self._free: queue.Queue = queue.Queue()
        self._blocks = [mmap.mmap(-1, BLOCK) for _ in range(BLOCKS)]  # anonymous maps are page-aligned
        for block in self._blocks:
            self._free.put(block)
        self._full: queue.Queue = queue.Queue()
        self._block = None
        self._used = 0
        self._error = None
        self.bytes_written = 0
        self._thread = threading.Thread(target=self._run, name=f"write {os.path.basename(path)}", daemon=True)
        self._thread.start()

    def _write_all(self, view) -> None:
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self._direct = False
                continue
            view = view[n:]

    def _run(self):
        while True:
            item = self._full.get()
            if item is None:
                return
            block, used = item
            try:
                if self._error is None:
                    with memoryview(block) as view:
                        padded = used if not self._direct else -(-used // ALIGN) * ALIGN
                        if padded != used:  # the last block: pad to the alignment, truncated on close
                            block[used:padded] = bytes(padded - used)
                        self._write_all(view[:padded])
            except BaseException as exc:  # reported on the next put/close, naming the file
                if isinstance(exc, OSError) and exc.filename is None:
                    exc.filename = self.path
                self._error = exc.with_traceback(None)  # keep no frames (and no views of the block) alive
            finally:
                self._free.put(block)

    def fill(self, n: int, produce) -> None:
        """Append n bytes that `produce(view, offset)` writes straight into the blocks (a pread lands in
        memory the writer DMAs from: no intermediate copy). `offset` counts from the start of these n bytes."""
        if self._error is not None:
            raise self._error
        done = 0
        while done < n:
            if self._block is None:
                self._block, self._used = self._free.get(), 0
            take = min(BLOCK - self._used, n - done)
            with memoryview(self._block) as view:
                produce(view[self._used:self._used + take], done)
                self._hash.update(view[self._used:self._used + take])
            self._used += take
            done += take
            if self._used == BLOCK:
                self._full.put((self._block, self._used))
                self._block = None
        self.bytes_written += n

    def put(self, data) -> None:
        """Copy `data` in (the caller may reuse its buffer as soon as this returns)."""
        src = memoryview(data).cast("B")

        def copy(view, offset):
            view[:] = src[offset:offset + len(view)]
        self.fill(len(src), copy)

    def _finish(self) -> None:
        if not self._thread.is_alive():
            return
        if self._block is not None:
            self._full.put((self._block, self._used))
            self._block = None
        self._full.put(None)
        self._thread.join()

    def close(self) -> str:
        """Drain, truncate the padding, fsync, close; return the sha256 of everything written."""
        self._finish()
        try:
            if self._error is not None:
                raise self._error
            os.ftruncate(self._fd, self.bytes_written)
            os.fsync(self._fd)
        finally:
            self._release()
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._finish()
        self._release()

    def _release(self) -> None:
        """Close the file and free the blocks; safe to call again (abort after a failed close)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)
        for block in self._blocks:
            try:
                block.close()
            except BufferError:  # a view is still held by an exception's traceback: freed when collected
                pass


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
        src = memoryview(data).cast("B")

        def copy(view, offset):
            view[:] = src[offset:offset + len(view)]
        self.fill(len(src), copy)

    def fill(self, n: int, produce) -> None:
        """n bytes of the current tensor from `produce(view, offset)`, a new record every 512 MiB."""
        name, shape, code, total, done = self._cur
        offset = 0
        while offset < n:
            if done and done % CKPT_SLICE == 0:  # a new record for the next 512 MiB
                self._sink.put(ckpt_record_header(name, shape, code, min(total - done, CKPT_SLICE)))
            take = min(CKPT_SLICE - done % CKPT_SLICE, n - offset)
            self._sink.fill(take, lambda view, o, base=offset: produce(view, base + o))
            done += take
            offset += take
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

    def fill(self, n: int, produce) -> None:
        self._cur[2] += n
        self._sink.fill(n, produce)

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


def safetensors_index(weight_map: dict, total_size: int) -> dict:
    """model.safetensors.index.json as transformers writes it: metadata.total_size (bytes of tensor data in
    all files) and weight_map (tensor name -> file name), sorted by tensor name."""
    return {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}


def write_safetensors_index(path: str, weight_map: dict, total_size: int) -> str:
    """Write the index atomically (fsynced); returns its sha256."""
    from .files import write_json
    return write_json(path, safetensors_index(weight_map, total_size))

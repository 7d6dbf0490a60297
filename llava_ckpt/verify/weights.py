"""Where one step's weights live while it runs, for both sides of the streamed verify.

A 7B decoder layer is ~0.8 GB in float32. Reading it into fresh buffers every step cost more than the
step's matmuls at decode time (measured: a float16 -> float32 cast into a fresh buffer 0.15 s for one
4096 x 11008 matrix, 0.024 s into a buffer used before: the difference is the kernel faulting in and
zeroing fresh pages, every step, because freed buffers go back to the OS). So the weights of a step are
cast into an arena straight from a map of their file's pages (or read with pread, into it or into one
staging buffer first): one flat buffer, carved into the step's tensors, handed out again from the start by the
next step. The steps of a walk need the same sizes over and over, so after the first decoder layer nothing is
allocated any more, and memory holds one step's
weights (the largest step's) plus one tensor's stored bytes.

The contract: `reset()` only when nothing from the previous step is still in use (the step's modules
dropped, MindSpore synchronized).
"""
from __future__ import annotations

import numpy as np

_ALIGN = 64  # bytes: every carved tensor starts on a cache line


class Arena:
    def __init__(self):
        self._chunks: list = []   # flat uint8 buffers; one after the first reset that follows a growth
        self._used = 0            # bytes handed out in the last chunk
        self._wanted = 0          # bytes this step has asked for in all
        self._high = 0            # the most any step has asked for
        self._staging = np.empty(0, np.uint8)

    def reset(self) -> None:
        """A new step: the previous step's tensors are dead. After a step that needed more than one chunk,
        the chunks are replaced by one of the largest step's size (so growth happens once per size)."""
        self._high = max(self._high, self._wanted)
        if len(self._chunks) > 1:
            self._chunks = []  # freed before the one buffer that replaces them is allocated
            self._chunks = [np.empty(self._high, np.uint8)]
        self._used = self._wanted = 0

    def take(self, shape, dtype) -> np.ndarray:
        """An uninitialized C-contiguous array of `shape` and `dtype`, valid until the next reset()."""
        dtype = np.dtype(dtype)
        n = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        self._wanted += n + _ALIGN  # an upper bound of what it takes with its alignment
        start = self._aligned()
        if start is None or start + n > self._chunks[-1].size:
            # a new chunk, large enough for the rest of a step as large as the largest one seen
            self._chunks.append(np.empty(max(n + _ALIGN, self._high - self._wanted + n + _ALIGN), np.uint8))
            self._used = 0
            start = self._aligned()
        self._used = start + n
        return self._chunks[-1][start:start + n].view(dtype).reshape(shape)

    def _aligned(self):
        if not self._chunks:
            return None
        return self._used + (-(self._chunks[-1].ctypes.data + self._used)) % _ALIGN

    def staging(self, nbytes: int) -> np.ndarray:
        """A byte buffer for one tensor's stored bytes (reused; grows to the largest tensor read)."""
        if self._staging.size < nbytes:
            self._staging = np.empty(nbytes, np.uint8)
        return self._staging[:nbytes]

    @property
    def nbytes(self) -> int:
        return sum(c.size for c in self._chunks) + self._staging.size


def as_torch(a: np.ndarray):
    """A torch tensor sharing `a`'s memory; bfloat16 arrays (ml_dtypes) go through their bits."""
    import torch
    if str(a.dtype) == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def cast_into(out: np.ndarray, value: np.ndarray) -> np.ndarray:
    """`value` (float16 / bfloat16 / float32) converted into `out`'s dtype, written into `out`: to bfloat16 with
    the bf16_matmul kernel's own rounding where it is built (nearest even, as torch rounds, 3-4x faster than
    torch's float16 -> bfloat16 copy), else torch casts (vectorized, several times numpy's float16 -> float32)."""
    from ..model.kernels import round_to_bfloat16
    value = np.ascontiguousarray(value)
    if str(out.dtype) == "bfloat16" and value.dtype != out.dtype and round_to_bfloat16(value, out):
        return out
    as_torch(out).copy_(as_torch(value).reshape(out.shape))
    return out


def read_into_arena(arena: Arena, reader, info, dtype) -> np.ndarray:
    """One stored tensor (io.readers.TensorInfo) in `dtype`, in the arena: read straight in when the stored
    dtype is already `dtype`, otherwise cast from a map of its file's pages (no copy of the stored bytes first:
    a 7B decoder layer's pread into the staging buffer cost as much as its cast, measured), or where it cannot be
    mapped through the staging buffer. The map is dropped once cast."""
    from ..io.dtypes import numpy_dtype
    stored = numpy_dtype(info.dtype)
    out = arena.take(tuple(info.shape), dtype)
    if stored == out.dtype:
        reader.read_bytes(info, 0, info.nbytes, out=out.reshape(-1).view(np.uint8))
        return out
    mapped = reader.mapped(info)
    if mapped is not None:
        try:
            return cast_into(out, mapped)
        finally:
            del mapped
    raw = reader.read_bytes(info, 0, info.nbytes, out=arena.staging(info.nbytes))
    return cast_into(out, np.frombuffer(raw, dtype=stored).reshape(info.shape))

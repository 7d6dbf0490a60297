"""The verify's arena: a step's weights in buffers the next step reuses (no fresh pages per layer), read
and cast exactly."""
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from llava_ckpt.io.readers import FileReader, read_safetensors_header
from llava_ckpt.verify.weights import Arena, cast_into, read_into_arena

LAYER = [((64, 32), np.float32), ((32, 64), np.float32), ((7,), np.float16), ((3, 5, 2), np.float32)]


def _step(arena, sizes):
    arena.reset()
    return [arena.take(shape, dtype) for shape, dtype in sizes]


def test_a_step_of_the_same_sizes_reuses_the_same_memory():
    arena = Arena()
    first = _step(arena, LAYER)
    for a, (shape, dtype) in zip(first, LAYER):
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.ctypes.data % 64 == 0
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in first)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no two tensors overlap
    again = _step(arena, LAYER)  # the first step's pieces are now one buffer
    size = arena.nbytes
    for _ in range(3):  # steady state: the same buffers, nothing allocated
        assert [a.ctypes.data for a in _step(arena, LAYER)] == [a.ctypes.data for a in again]
        assert arena.nbytes == size


def test_a_larger_step_grows_the_arena_once():
    arena = Arena()
    _step(arena, LAYER[:1])
    big = [((256, 256), np.float32)] * 3
    _step(arena, big)
    grown = _step(arena, big)
    assert len(arena._chunks) == 1 and arena._chunks[0].size >= 3 * 256 * 256 * 4
    assert [a.ctypes.data for a in _step(arena, big)] == [a.ctypes.data for a in grown]
    small = _step(arena, LAYER)  # smaller steps fit in what is there
    assert len(arena._chunks) == 1 and all(arena._chunks[0].ctypes.data <= a.ctypes.data for a in small)


def test_read_into_arena_casts_every_stored_dtype_exactly(tmp_path):
    rng = np.random.default_rng(0)
    values = {"f32": rng.standard_normal((40, 24)).astype(np.float32),
              "f16": rng.standard_normal((24, 40)).astype(np.float16),
              "bf16": rng.standard_normal((5, 8)).astype(ml_dtypes.bfloat16)}
    path = str(tmp_path / "w.safetensors")
    save_file(values, path)
    infos = read_safetensors_header(path)
    arena = Arena()
    with FileReader() as reader:
        for target in (np.float32, np.float16):
            arena.reset()
            for name, v in values.items():
                got = read_into_arena(arena, reader, infos[name], target)
                assert got.dtype == target and got.shape == v.shape
                np.testing.assert_array_equal(got, v.astype(np.float32).astype(target))
    out = cast_into(np.empty((8, 5), np.float32), values["bf16"].T)  # non-contiguous input
    np.testing.assert_array_equal(out, values["bf16"].T.astype(np.float32))

"""The way forward (llava_ckpt/engine/forward.py) with tensors far larger than its chunk and the writers' blocks.

The tiny fixture's tensors fit in one 16 MiB chunk, so here the chunk is shrunk to 3000 bytes (not a multiple
of any row size) and the writer block to 8 KiB: every gather (grouped q/k/v, interleaved gate/up, casts, rank
cuts along both dims) and every direct copy then runs over many chunks and blocks. The results are checked
against tests/expected.py, which spells the mapping out by hand.
"""
import numpy as np
import pytest

from llava_ckpt.engine import forward
from llava_ckpt.convert import convert
from llava_ckpt.io import writers
from llava_ckpt.shard import shard

from expected import expected, load_config, mismatches, read_hf, read_with_mindspore
from test_shard import expected_slice

CHUNK, BLOCK = 3000, 8192


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(forward, "CHUNK", CHUNK)
    monkeypatch.setattr(writers, "BLOCK", BLOCK)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("dtype", [None, "float32"])
def test_convert_across_chunks(tiny, tmp_path, small_chunks, fuse, dtype, fmt):
    convert(tiny, str(tmp_path / "out"), dtype=dtype, fmt=fmt, fuse_qkv=fuse, progress=False)
    hf = read_hf(tiny)
    assert max(a.nbytes for a in hf.values()) > 100 * CHUNK  # the oracle really spans many chunks
    want = expected(hf, load_config(tiny), fuse_qkv=fuse)
    got = read_with_mindspore(str(tmp_path / "out" / f"llava.{fmt}"))
    assert mismatches(got, want, np.float32 if dtype else None) == []


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("direct", [False, True])
def test_shard_across_chunks(tiny, tmp_path, small_chunks, fuse, direct):
    out, tp = tmp_path / "tp", 2
    if direct:
        convert(tiny, str(out), fuse_qkv=fuse, tp=tp, fmt="safetensors", progress=False)
    else:
        convert(tiny, str(tmp_path / "one"), fuse_qkv=fuse, fmt="safetensors", progress=False)
        shard(str(tmp_path / "one"), str(out), tp=tp, progress=False)
    want = expected(read_hf(tiny), load_config(tiny), fuse_qkv=fuse)
    for r in range(tp):
        got = read_with_mindspore(str(out / f"rank_{r}" / "llava.safetensors"))
        assert mismatches(got, {n: expected_slice(n, a, r, tp) for n, a in want.items()}) == []


def test_spans_never_cross_a_rank_boundary():
    for n_rows, step, tp in [(100, 7, 4), (64, 64, 2), (12, 5, 3)]:
        spans = forward._spans(n_rows, step, 0, tp)
        per = n_rows // tp
        assert [(a, b) for _, a, b in spans] == sorted((a, b) for _, a, b in spans)
        assert all(r * per <= a < b <= (r + 1) * per and b - a <= step for r, a, b in spans)
        assert sum(b - a for _, a, b in spans) == n_rows

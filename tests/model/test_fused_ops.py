"""The fused float32 ops (model/kernels/fused_ops.cc) and bf16_matmul's bias entry: each equals its formula
computed in float64 by numpy, at widths and lengths around the kernels' 16-lane and 8-query edges, masks with
padded and unseen rows, grouped k/v heads; a float32 model's cells take them (in both prefill modes) and give what
the same cells give through MindSpore's ops; float64 cells and LLAVA_CKPT_FUSED_OPS=0 keep MindSpore's ops. They run
with the build this CPU gets (AVX-512, else AVX2); the bfloat16 mode's cells take float32 products where
bf16_matmul cannot run, and are still compared with the same cells through MindSpore's ops."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from llava_ckpt.model import kernels
from llava_ckpt.model.layers import LayerNorm, Linear, RMSNorm
from llava_ckpt.model.llama import DecoderLayer, attention_bias, causal_bias, head_columns
from llava_ckpt.model.vision import ResBlock
from llava_ckpt.model.layers import rope_tables
from cpu import avx2_lacks, bf16_lacks

pytestmark = pytest.mark.skipif(bool(avx2_lacks()), reason=avx2_lacks() or "runs")
needs_bf16 = pytest.mark.skipif(bool(bf16_lacks()), reason=bf16_lacks() or "runs")
MASKED = float(np.finfo(np.float32).min)


@pytest.fixture(autouse=True)
def cpu():
    ms.set_context(device_target="CPU", mode=ms.PYNATIVE_MODE)


def fused():
    got = kernels.fused_ops("float32")
    assert got is not None, kernels.fused_ops_status()
    return got


def f32(a):
    return Tensor(np.ascontiguousarray(a, dtype=np.float32))


@pytest.mark.parametrize("rows,width", [(1, 1), (3, 15), (8, 16), (5, 33), (2, 4096)])
def test_norms_are_their_formulas(rows, width):
    rng = np.random.default_rng(rows * 101 + width)
    x = (rng.standard_normal((rows, width)) * 3 + 0.5).astype(np.float32)
    w, b = rng.standard_normal(width).astype(np.float32), rng.standard_normal(width).astype(np.float32)
    eps = 1e-5
    ops_ = fused()
    x64 = x.astype(np.float64)
    rms = w * (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps))
    got = ops_.rms_norm(f32(x), f32(w), f32([eps])).asnumpy()
    np.testing.assert_allclose(got, rms, rtol=2e-6, atol=2e-6 * np.abs(rms).max())
    d = x64 - x64.mean(-1, keepdims=True)
    ln = d / np.sqrt((d * d).mean(-1, keepdims=True) + eps) * w + b
    got = ops_.layer_norm(f32(x), f32(w), f32(b), f32([eps])).asnumpy()
    np.testing.assert_allclose(got, ln, rtol=2e-6, atol=2e-6 * np.abs(ln).max())


@pytest.mark.parametrize("n", [1, 17, 200])
def test_activations_are_their_formulas(n):
    rng = np.random.default_rng(n)
    g = (rng.standard_normal((3, n)) * 6).astype(np.float32)
    g[0, :min(n, 4)] = [-200.0, -90.0, 90.0, 200.0][:min(n, 4)]  # past exp's range both ways
    u = rng.standard_normal((3, n)).astype(np.float32)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    silu = g64 / (1 + np.exp(-g64)) * u64
    ops_ = fused()
    np.testing.assert_allclose(ops_.silu_mul(f32(g), f32(u)).asnumpy(), silu, rtol=2e-6, atol=1e-30)
    pairs = np.stack([g, u], -1).reshape(3, 2 * n)  # (gate, up) interleaved, w_gate_hidden's layout
    np.testing.assert_allclose(ops_.silu_mul_pairs(f32(pairs)).asnumpy(), silu, rtol=2e-6, atol=1e-30)
    gelu = g64 / (1 + np.exp(-1.702 * g64))
    np.testing.assert_allclose(ops_.quick_gelu(f32(g.reshape(-1))).asnumpy(), gelu.reshape(-1), rtol=2e-6,
                               atol=1e-30)


def rotate(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], -1)


@pytest.mark.parametrize("fused_layout", [True, False])
@pytest.mark.parametrize("per_row", [False, True])
def test_heads_split_with_rope(fused_layout, per_row):
    b, s, heads, kv, d = 2, 11, 4, 2, 8
    rep = heads // kv
    rng = np.random.default_rng(3)
    cos = rng.standard_normal((b if per_row else 1, s, d)).astype(np.float32)
    sin = rng.standard_normal(cos.shape).astype(np.float32)
    cols = Tensor(head_columns(heads, kv, d, fused_layout))
    if fused_layout:  # w_qkv's rows grouped per kv head: [q of the group's heads; k; v]
        y = rng.standard_normal((b, s, (heads + 2 * kv) * d)).astype(np.float32)
        g = y.reshape(b, s, kv, rep + 2, d)
        q, k, v = g[:, :, :, :rep].reshape(b, s, heads, d), g[:, :, :, rep], g[:, :, :, rep + 1]
        srcs = (f32(y),) * 3
    else:
        q, k, v = (rng.standard_normal((b, s, n, d)).astype(np.float32) for n in (heads, kv, kv))
        srcs = tuple(f32(a.reshape(b, s, -1)) for a in (q, k, v))
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    c, n = cos[:, None], sin[:, None]
    split = fused().split_heads(heads, kv, d, rope=True)
    got = [t.asnumpy() for t in split(*srcs, cols, f32(cos), f32(sin))]
    want = [q * c + rotate(q) * n, k * c + rotate(k) * n, v]
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape
        np.testing.assert_allclose(g_, w_, rtol=1e-6, atol=1e-6)
    plain = fused().split_heads(heads, kv, d, rope=False)
    got = [t.asnumpy() for t in plain(*srcs, cols)]
    for g_, w_ in zip(got, (q, k, v)):
        np.testing.assert_array_equal(g_, w_)


def test_identical_calls_give_identical_values_whichever_thread_runs_an_item():
    """Two threads hand the items out between them anew on every call. Built with FMA contraction on, the two
    compiled copies of the RoPE loop (the calling thread's, std::thread's) rounded q differently: about 1 call in
    200 here gave values 1 ulp apart. Every light op is in the loop (norms, heads, SiLU x up, attention)."""
    import os
    b, s, heads, kv, d = 1, 128, 32, 8, 8  # q: 32K floats, enough to be threaded
    rng = np.random.default_rng(5)
    cos, sin = (f32(rng.standard_normal((1, s, d))) for _ in range(2))
    y = f32(rng.standard_normal((b, s, (heads + 2 * kv) * d)))
    x, w = f32(rng.standard_normal((s, 1024))), f32(rng.standard_normal(1024))
    pairs = f32(rng.standard_normal((s, 2048)))
    cols, eps = Tensor(head_columns(heads, kv, d, True)), f32([1e-5])
    ops_ = fused()
    split = ops_.split_heads(heads, kv, d, rope=True)
    bias, scale = f32(causal_bias(s)[None]), f32([d ** -0.5])

    def once():
        q, k, v = split(y, y, y, cols, cos, sin)
        return [t.asnumpy() for t in (q, k, v, ops_.attention(q, k, v, bias, scale), ops_.rms_norm(x, w, eps),
                                      ops_.layer_norm(x, w, w, eps), ops_.silu_mul_pairs(pairs))]
    kernels.set_threads(2)
    try:
        first = once()
        differing = sum(any(not np.array_equal(a, b) for a, b in zip(once(), first)) for _ in range(1500))
    finally:
        kernels.set_threads(len(os.sched_getaffinity(0)))
    assert differing == 0


def attention_reference(q, k, v, bias, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, 1).astype(np.float64), np.repeat(v, rep, 1).astype(np.float64)
    scores = q.astype(np.float64) @ k.transpose(0, 1, 3, 2) * scale + bias[:, None]
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    b, h, s, d = q.shape
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, s, h * d)


@pytest.mark.parametrize("heads,kv,d", [(4, 4, 16), (4, 2, 24), (2, 1, 130)])
@pytest.mark.parametrize("mask", ["causal", "padded", "none"])
def test_attention_is_softmax_attention(heads, kv, d, mask):
    b, s = 3, 37  # 37: query blocks of 8 and key steps of 32 with tails
    rng = np.random.default_rng(heads * 10 + d)
    q = rng.standard_normal((b, heads, s, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, kv, s, d)).astype(np.float32) for _ in range(2))
    if mask == "causal":
        bias = causal_bias(s)[None]
    elif mask == "padded":  # left padding: row 1 pads 5 positions, row 2 pads 20; padded queries see nothing
        keep = np.tril(np.ones((b, s, s), bool))
        for row, pad in ((1, 5), (2, 20)):
            keep[row, :, :pad] = False
        bias = attention_bias(keep)
        assert (bias[2, 3] == MASKED).all()  # a query that sees no key: softmax over all, uniform
    else:
        bias = np.zeros((1, s, s), np.float32)
    scale = d ** -0.5
    got = fused().attention(f32(q), f32(k), f32(v), f32(bias), f32([scale])).asnumpy()
    want = attention_reference(q, k, v, np.broadcast_to(bias, (b, s, s)), scale)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("heads,kv,d", [(4, 4, 128), (4, 2, 24), (2, 1, 130)])
@pytest.mark.parametrize("new", [1, 3])
def test_attention_cached_is_attention_over_the_written_cache(heads, kv, d, new):
    """A decode step's attention over the cache's slots (k stored [B, kv, d, T]) and the new positions equals
    softmax attention over the cache with the new k / v written in; slots a row may not see (left padding,
    slots not filled yet) hold garbage that must not count."""
    b, t, filled = 3, 53, 40  # 53 slots: key steps of 48 with a tail; slots 40.. not filled yet
    rng = np.random.default_rng(heads * 100 + d + new)
    q = rng.standard_normal((b, heads, new, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, kv, new, d)).astype(np.float32) for _ in range(2))
    k_slots, v_slots = (rng.standard_normal((b, kv, t, d)).astype(np.float32) for _ in range(2))
    keep = np.zeros((b, new, t + new), bool)
    keep[:, :, :filled] = True
    keep[1, :, :7] = keep[2, :, :30] = False  # left padding of rows 1 and 2
    keep[:, :, t:] = np.tril(np.ones((new, new), bool))  # the new positions, causal among themselves
    for row in range(b):  # what a row may not see: huge, so counting it would show
        k_slots[row, :, ~keep[row, 0, :t]] = 1e4
        v_slots[row, :, ~keep[row, 0, :t]] = -1e4
    bias = attention_bias(keep)
    scale = d ** -0.5
    k_cache = np.ascontiguousarray(k_slots.transpose(0, 1, 3, 2))
    got = fused().attention_cached(f32(q), f32(k), f32(v), f32(k_cache), f32(v_slots), f32(bias),
                                   f32([scale])).asnumpy()
    want = attention_reference(q, np.concatenate([k_slots, k], 2), np.concatenate([v_slots, v], 2), bias, scale)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def _cached_inputs(b=2, heads=4, kv=2, new=1, d=16, t=5):
    z = np.zeros
    return {"q": z((b, heads, new, d)), "k": z((b, kv, new, d)), "v": z((b, kv, new, d)), "k_cache": z((b, kv, d, t)),
            "v_cache": z((b, kv, t, d)), "bias": z((1, new, t + new)), "scale": [1.0]}


@pytest.mark.parametrize("name,shape", [("k", (2, 2, 1, 8)), ("v", (2, 1, 1, 16)), ("k_cache", (2, 2, 16, 4)),
                                        ("v_cache", (2, 2, 4, 16)), ("bias", (3, 1, 6)), ("bias", (1, 1, 5)),
                                        ("q", (2, 3, 1, 16))])
def test_the_attention_entries_refuse_shapes_that_disagree(name, shape):
    """The kernel reads past no edge: a shape that does not fit the others is refused (code 3), in the prompt's
    entry as in the cached one."""
    good = _cached_inputs()
    assert fused().attention_cached(*(f32(a) for a in good.values())).asnumpy().shape == (2, 1, 64)
    bad = dict(good, **{name: np.zeros(shape)})
    with pytest.raises(RuntimeError, match="AttentionCached.* is 3"):
        fused().attention_cached(*(f32(a) for a in bad.values())).asnumpy()
    if name in ("k", "v", "bias", "q"):  # the prompt's entry: q, k, v over T = 1 key, bias [Bb, S, T]
        prompt = {"q": good["q"], "k": good["k"], "v": good["v"], "bias": np.zeros((1, 1, 1)), "scale": [1.0]}
        assert fused().attention(*(f32(a) for a in prompt.values())).asnumpy().shape == (2, 1, 64)
        wrong = dict(prompt, **{name: np.zeros(shape if name != "bias" else (3, 1, 1))})
        with pytest.raises(RuntimeError, match="Attention.* is 3"):
            fused().attention(*(f32(a) for a in wrong.values())).asnumpy()


@needs_bf16
@pytest.mark.parametrize("rows", [9, 40])
def test_bf16_matmul_bias_entry_adds_the_bias_once(rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 4099)).astype(np.float32)  # three blocks of K: the bias in the first only
    w = rng.standard_normal((70, 4099)).astype(np.float16)
    bias = (rng.standard_normal(70) * 10).astype(np.float32)
    with kernels.prefill_matmul("bfloat16"):
        plain, with_bias = kernels.prefill_matmul_op("float32"), kernels.prefill_matmul_op("float32", bias=True)
    want = plain(f32(x), Tensor(w)).asnumpy() + bias
    got = with_bias(f32(x), Tensor(w), f32(bias)).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


@needs_bf16
@pytest.mark.parametrize("rows,k", [(9, 4099), (40, 2048), (17, 100)])
def test_bf16_matmul_residual_entry_adds_the_residual_to_the_finished_product(rows, k):
    """r + x @ w.T bit for bit as the plain entry and a float32 add give it (the residual added after the last
    block of K, not before the first: the sum's order a separate add has), one to three blocks of K."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((70, k)).astype(np.float16)
    r = (rng.standard_normal((rows, 70)) * 10).astype(np.float32)
    with kernels.prefill_matmul("bfloat16"):
        plain, with_r = kernels.prefill_matmul_op("float32"), kernels.prefill_matmul_op("float32", residual=True)
    want = r + plain(f32(x), Tensor(w)).asnumpy()
    got = with_r(f32(x), Tensor(w), f32(r)).asnumpy()
    np.testing.assert_array_equal(got, want)
    with pytest.raises(RuntimeError):  # a residual of another shape is refused, not read past its end
        with_r(f32(x), Tensor(w), f32(r[:, :69])).asnumpy()


def _fill(cell, seed):
    rng = np.random.default_rng(seed)
    for p in cell.get_parameters():
        value = rng.standard_normal(p.shape).astype(np.float32)
        p.set_data(Tensor(value * 0.2 if len(p.shape) == 2 else 1 + 0.1 * value))


def _without_fused_ops(cell):
    """The same cell (the same weights, the same bf16_matmul) through MindSpore's ops."""
    for _, c in cell.cells_and_names():
        if getattr(c, "fused_ops", None) is not None:
            c.fused_ops = None
    return cell


TC = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
      "intermediate_size": 96, "rms_norm_eps": 1e-6}


@pytest.mark.parametrize("fused_layout", [True, False])
def test_a_decoder_layer_in_the_bfloat16_mode_is_the_same_layer_through_mindspore_ops(fused_layout):
    with kernels.prefill_matmul("bfloat16"):
        layer, plain = DecoderLayer(TC, fused_layout, "float32"), DecoderLayer(TC, fused_layout, "float32")
    assert layer.attention.fused_ops is not None and layer.feed_forward.fused_ops is not None
    assert layer.attention_norm.fused_ops is not None
    _fill(layer, 1)
    _fill(plain, 1)
    _without_fused_ops(plain)
    b, s = 2, 19
    x = f32(np.random.default_rng(2).standard_normal((b, s, 64)))
    cos, sin = rope_tables(16, 10000.0, 64)
    keep = np.tril(np.ones((b, 1, s, s), bool))
    keep[1, :, :, :4] = False
    bias = f32(attention_bias(keep))
    pos = Tensor(np.arange(s, dtype=np.int32))
    cos, sin = ms.ops.gather(cos, pos, 0), ms.ops.gather(sin, pos, 0)
    got, want = layer.prefill(x, cos, sin, bias), plain.prefill(x, cos, sin, bias)
    for g, w in zip(got, want):
        g, w = g.asnumpy(), w.asnumpy()
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_a_clip_block_in_the_bfloat16_mode_is_the_same_block_through_mindspore_ops():
    vc = {"hidden_size": 48, "num_attention_heads": 3, "intermediate_size": 80, "layer_norm_eps": 1e-5}
    with kernels.prefill_matmul("bfloat16"):
        block, plain = ResBlock(vc, "float32"), ResBlock(vc, "float32")
    assert block.attn.fused_ops is not None and block.mlp.fused_ops is not None
    assert (block.mlp.c_fc.prefill_matmul_bias is not None) == (not bf16_lacks())
    _fill(block, 4)
    _fill(plain, 4)
    _without_fused_ops(plain)
    for _, c in plain.cells_and_names():
        if isinstance(c, Linear):
            c.prefill_matmul_bias = None  # the plain bf16_matmul and MindSpore's bias add
    x = f32(np.random.default_rng(5).standard_normal((2, 21, 48)))
    g, w = block(x).asnumpy(), plain(x).asnumpy()
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


@pytest.mark.parametrize("mode", ["float32", "bfloat16"])
def test_every_float32_cell_takes_them_in_either_prefill_mode(mode):
    with kernels.prefill_matmul(mode):
        cells = [RMSNorm(8, 1e-6, "float32"), LayerNorm(8, 1e-5, "float32"), DecoderLayer(TC, True, "float32"),
                 ResBlock({"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16,
                           "layer_norm_eps": 1e-5}, "float32")]
    for cell in cells:
        assert all(c.fused_ops is not None for _, c in cell.cells_and_names() if hasattr(c, "fused_ops"))


def test_float64_and_the_switch_keep_mindspores_ops(monkeypatch):
    """verify's drift rerun computes in float64 with MindSpore's ops; LLAVA_CKPT_FUSED_OPS=0 turns them off."""
    assert kernels.fused_ops("float64") is None
    assert RMSNorm(8, 1e-6, "float64").fused_ops is None
    monkeypatch.setenv("LLAVA_CKPT_FUSED_OPS", "0")
    assert kernels.fused_ops("float32") is None
    assert kernels.fused_ops_status("float32") == "MindSpore ops (LLAVA_CKPT_FUSED_OPS=0)"
    layer = DecoderLayer(TC, True, "float32")
    assert all(getattr(c, "fused_ops", None) is None for _, c in layer.cells_and_names())

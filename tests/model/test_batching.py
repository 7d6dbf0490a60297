"""Batched generation in the reference model: left-padded rows with their own positions give what each row
gives alone (and what transformers gives), rows stop at eos, sampling is reproducible and filters like
transformers' top-p."""
import numpy as np
import pytest
import torch

from llava_ckpt.errors import CheckpointError
from llava_ckpt.model import Runner, build_and_load
from llava_ckpt.model.sampling import nucleus_probs, sampler

from llava_tiny import hf_model, ms_config, pixels, prompt_ids, to_ms

N = 6
PAD = 32001


@pytest.fixture(scope="module")
def setup():
    """GQA tiny model, three prompts of different lengths and images, each one's transformers greedy tokens."""
    hf = hf_model(seed=2, num_key_value_heads=2)
    model, _ = build_and_load(ms_config(hf), to_ms(hf, fused=True))
    rows = [prompt_ids(3, 4, seed=1)[0], prompt_ids(9, 13, seed=2)[0], prompt_ids(1, 2, seed=3)[0]]
    px = np.concatenate([pixels(seed=s) for s in (1, 2, 3)])
    want = []
    with torch.no_grad():
        for r, p in zip(rows, px):
            out = hf.generate(input_ids=torch.from_numpy(r[None]), pixel_values=torch.from_numpy(p[None]),
                              max_new_tokens=N, do_sample=False, eos_token_id=None)
            want.append(out[0, len(r):].tolist())
    return hf, Runner(model), rows, px, want


@pytest.fixture(scope="module")
def stored():
    """generate's layout: 16-bit weights kept as stored (float16 and bfloat16 matrices), float32 compute,
    eager. transformers runs the same weights widened to float32 (exact), so its greedy tokens are the target."""
    import ml_dtypes
    hf = hf_model(seed=4, num_key_value_heads=2)
    with torch.no_grad():  # weights that float16 and bfloat16 hold exactly
        for name, p in hf.named_parameters():
            text_mlp = "language_model" in name and "mlp" in name
            p.copy_(p.to(torch.bfloat16 if text_mlp else torch.float16).float())
    weights = {}
    for name, value in to_ms(hf, fused=False).items():
        wide = "w1" in name or "w2" in name or "w3" in name
        weights[name] = value.astype(ml_dtypes.bfloat16 if wide else np.float16)
    model, _ = build_and_load(ms_config(hf), weights, stored=True)
    rows = [prompt_ids(3, 4, seed=1)[0], prompt_ids(9, 13, seed=2)[0]]
    px = np.concatenate([pixels(seed=s) for s in (1, 2)])
    with torch.no_grad():
        want = [hf.generate(input_ids=torch.from_numpy(r[None]), pixel_values=torch.from_numpy(p[None]),
                            max_new_tokens=N, do_sample=False, eos_token_id=None)[0, len(r):].tolist()
                for r, p in zip(rows, px)]
    return model, rows, px, want


def test_sixteen_bit_weights_eager_give_transformers_float32_tokens(stored):
    """What generate runs: the big matrices stay 16-bit (checked: no float32 copy made), the rest is cast,
    the prefill writes each layer's k/v into the host cache, and the batch gives transformers' tokens."""
    from mindspore import float16, bfloat16, float32
    model, rows, px, want = stored
    kinds = {p.name: p.dtype for p in model.get_parameters()}
    assert kinds["language_model.model.layers.0.attention.wq.weight"] == float16
    assert kinds["language_model.model.layers.0.feed_forward.w1.weight"] == bfloat16
    assert kinds["language_model.model.tok_embeddings.embedding_weight"] == float16
    assert kinds["language_model.model.layers.0.attention_norm.weight"] == float32
    ids, mask = left_pad(rows, 3)
    out = Runner(model, jit=False).generate_batch(ids, mask, px, N, pad_id=PAD)
    assert out["tokens"] == want and len({tuple(w) for w in want}) == 2


def test_a_reserved_cache_serves_every_batch_after_it_as_fresh_memory_would(stored):
    """generate reserves the largest batch's KV cache before the first prefill (Runner.reserve_cache); each batch
    takes it zeroed: a smaller batch after a larger one, the same tokens, and a batch larger than the reserve gets
    fresh memory. The reserve is filled with NaN first: any slot a batch read without zeroing would show."""
    from llava_ckpt.model.llama import KVCache
    model, rows, px, want = stored
    runner = Runner(model, jit=False)
    runner.reserve_cache(2, max(len(r) for r in rows) + 3 + N)
    runner._cache_memory.fill(np.nan)
    ids, mask = left_pad(rows, 3)
    assert runner.generate_batch(ids, mask, px, N, pad_id=PAD)["tokens"] == want
    ids1, mask1 = left_pad(rows[1:])
    assert runner.generate_batch(ids1, mask1, px[1:], N, pad_id=PAD)["tokens"] == want[1:]
    memory = np.full(10, np.nan, np.float32)
    small = KVCache.empty(1, (1, 1, 2, 2), np.float32, memory=memory)
    assert np.shares_memory(small.k[0], memory) and not np.isnan(memory[:8]).any() and np.isnan(memory[8:]).all()
    large = KVCache.empty(2, (1, 1, 2, 2), np.float32, memory=memory)  # 16 values: more than the reserve
    assert not np.shares_memory(large.k[0], memory) and not large.k[1].any()


def left_pad(rows, extra=0):
    length = max(len(r) for r in rows) + extra
    ids = np.full((len(rows), length), PAD, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    return ids, mask


def test_padded_batch_equals_rows_alone_and_transformers(setup):
    _, runner, rows, px, want = setup
    assert len({len(r) for r in rows}) == 3
    for extra in (0, 5):  # padding beyond the longest row (length buckets) changes nothing
        ids, mask = left_pad(rows, extra)
        out = runner.generate_batch(ids, mask, px, N, pad_id=PAD)
        assert out["tokens"] == want, extra
        assert out["finish"] == ["length"] * 3
        assert out["decode_tokens"] == 3 * (N - 1)
    alone = [runner.generate(r[None], p[None], N)["tokens"] for r, p in zip(rows, px)]
    assert alone == want
    assert len({tuple(w) for w in want}) == 3  # the rows really differ


def test_rows_stop_at_eos_the_others_go_on(setup):
    hf, runner, rows, px, want = setup
    stop = want[1][2]  # row 1's third token ends it
    assert stop not in want[1][:2]
    ids, mask = left_pad(rows)
    out = runner.generate_batch(ids, mask, px, N, eos=(stop,), pad_id=PAD)
    assert out["tokens"][1] == want[1][:3] and out["finish"][1] == "stop"
    for i in (0, 2):
        if stop in want[i]:
            assert out["tokens"][i] == want[i][:want[i].index(stop) + 1]
        else:
            assert out["tokens"][i] == want[i] and out["finish"][i] == "length"
    with torch.no_grad():  # transformers stops the same row at the same place
        theirs = hf.generate(input_ids=torch.from_numpy(rows[1][None]), pixel_values=torch.from_numpy(px[1:2]),
                             max_new_tokens=N, do_sample=False, eos_token_id=stop)
    assert theirs[0, len(rows[1]):].tolist() == out["tokens"][1]


def test_right_padding_is_refused(setup):
    _, runner, rows, px, _ = setup
    ids, mask = left_pad(rows)
    with pytest.raises(CheckpointError, match="left-padded"):
        runner.generate_batch(ids[:, ::-1].copy(), mask[:, ::-1].copy(), px, 2)


def test_sampling_is_reproducible_with_a_seed(setup):
    _, runner, rows, px, want = setup
    ids, mask = left_pad(rows)

    def run(seed):
        return runner.generate_batch(ids, mask, px, N, choose=sampler(1.5, 0.95, seed), pad_id=PAD)["tokens"]
    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c and a != want


def test_nucleus_filter_keeps_the_smallest_set_reaching_top_p():
    p = np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = np.log(p)
    np.testing.assert_allclose(nucleus_probs(logits, 1.0, 1.0), p)
    np.testing.assert_allclose(nucleus_probs(logits, 1.0, 0.75), [[0.625, 0.375, 0, 0], [0, 0, 0.375, 0.625]])
    np.testing.assert_allclose(nucleus_probs(logits, 1.0, 0.81), [[0.5, 0.3, 0.15, 0] / np.float64(0.95),
                                                                  [0, 0.15, 0.3, 0.5] / np.float64(0.95)])
    np.testing.assert_allclose(nucleus_probs(logits, 1.0, 0.1), [[1, 0, 0, 0], [0, 0, 0, 1]])
    hot = nucleus_probs(logits, 2.0, 1.0)[0]
    np.testing.assert_allclose(hot, np.sqrt(p[0]) / np.sqrt(p[0]).sum())
    draws = [int(sampler(1.0, 0.75, s)(logits)[0]) for s in range(200)]
    assert set(draws) == {0, 1} and 0.5 < draws.count(0) / 200 < 0.75
    with pytest.raises(CheckpointError, match="temperature"):
        sampler(0.0)
    with pytest.raises(CheckpointError, match="top_p"):
        sampler(1.0, 1.5)

"""13B structure, no code change: a checkpoint shaped like llava-1.5-13b-hf scaled down (40 heads of 40 KV
heads, ffn/hidden 2.7, vocab 32064, two text layers) converts, shards (--tp 2, 4, 8 all divide its 40 heads)
and verifies at tp 1 and tp 2. The real 13b-few-layers preset (2.6 GB) runs in benchmarks/verify.py."""
import pytest

from llava_ckpt.convert import convert
from llava_ckpt.fixture import TEXT_13B
from llava_ckpt.shard import shard
from llava_ckpt.verify import format_report, verify

SCALED_13B = {"hidden_size": 160, "intermediate_size": 432, "num_attention_heads": TEXT_13B["num_attention_heads"],
              "num_key_value_heads": TEXT_13B["num_key_value_heads"], "num_hidden_layers": 2}


@pytest.fixture(scope="module")
def src(tiny_factory):
    return tiny_factory(text_overrides=SCALED_13B)


def test_13b_structure_verifies_at_tp1_and_tp2(src, tmp_path):
    one = str(tmp_path / "tp1")
    convert(src, one, fuse_qkv=True, progress=False)
    r = verify(src, one, max_new_tokens=2)
    assert r["passed"], format_report(r)
    assert r["fused_qkv"] and len([m for m in r["modules"] if ".layers." in m["name"]]) == 2
    two = str(tmp_path / "tp2")
    shard(one, two, tp=2, progress=False)
    r = verify(src, two, max_new_tokens=2, msrun=False)
    assert r["passed"] and r["tp"] == 2, format_report(r)


@pytest.mark.parametrize("tp", [4, 8])
def test_13b_structure_shards_to_4_and_8(src, tmp_path, tp):
    out = str(tmp_path / f"tp{tp}")
    convert(src, out, fmt="safetensors", tp=tp, progress=False)
    from llava_ckpt.verify.converted import open_converted
    got = open_converted(out)
    merged, n = got["tensors"], got["tp"]
    w = merged["language_model.model.layers.0.attention.wq.weight"]
    assert n == tp and w.shape == (160, 160) and merged.replica_mismatch == set()
    merged.close()

"""Rank files read back as whole tensors through their manifest's split kinds; replicas that differ are
recorded, not silently averaged or picked."""
import json
import os

import numpy as np
import pytest

from llava_ckpt.convert import convert
from llava_ckpt.errors import CheckpointError
from llava_ckpt.io import load_tensors
from llava_ckpt.verify.converted import open_converted, stored_dtypes
from in_place import edit_tensors


def test_rank_files_reassemble_to_the_tp1_tensors(tiny, tmp_path):
    one, two = str(tmp_path / "tp1"), str(tmp_path / "tp2")
    convert(tiny, one, fmt="safetensors", fuse_qkv=True, progress=False)
    convert(tiny, two, fmt="safetensors", fuse_qkv=True, tp=2, progress=False)
    a, b = open_converted(one), open_converted(two)
    (whole, tp), (merged, tp2) = (a["tensors"], a["tp"]), (b["tensors"], b["tp"])
    assert (tp, tp2) == (1, 2) and set(merged) == set(whole)
    kinds = {e["name"]: e["split"] for e in json.load(open(os.path.join(two, "manifest.json")))["tensors"]}
    assert {"column", "row", "vocab", "replicated"} <= set(kinds.values())
    for name in whole:
        assert np.array_equal(merged[name], whole[name]), name
    assert merged.replica_mismatch == set()
    assert stored_dtypes(merged) == stored_dtypes(whole)
    merged.close()


def test_replica_mismatch_is_recorded(tiny, tmp_path):
    out = str(tmp_path / "tp2")
    convert(tiny, out, fmt="safetensors", tp=2, progress=False)
    name = "language_model.model.norm_out.weight"
    edit_tensors(os.path.join(out, "rank_1", "llava.safetensors"), lambda t: t.update({name: t[name] + 1}))
    merged = open_converted(out)["tensors"]
    got = merged[name]
    assert merged.replica_mismatch == {name}
    assert np.array_equal(got, load_tensors(os.path.join(out, "rank_0"))[name])


def test_rank_folders_come_from_the_manifest(tiny, tmp_path):
    out = tmp_path / "tp2"
    convert(tiny, str(out), fmt="safetensors", tp=2, progress=False)
    got = open_converted(str(out))
    assert got["tp"] == 2 and [os.path.basename(d) for d in got["rank_dirs"]] == ["rank_0", "rank_1"]
    assert got["layout"]["language_model.model.layers.0.attention.wo.weight"][0] == "row"
    os.rename(out / "rank_1", tmp_path / "rank_1")
    with pytest.raises(CheckpointError, match=r"records tp 2 .*rank_1 missing"):
        open_converted(str(out))
    with pytest.raises(CheckpointError, match="nope does not exist"):
        open_converted(str(tmp_path / "nope"))
    bare = tmp_path / "bare"
    (bare / "rank_0").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds rank_<r>/ folders but no manifest.json"):
        open_converted(str(bare))

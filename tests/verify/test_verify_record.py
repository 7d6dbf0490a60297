"""verification.json: what verify proved, written into MS_DIR by a passing or failing verify (atomically), with
the sha256 of every file it was proven on; `check` reports it and says when it no longer applies."""
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from llava_ckpt.check import check
from llava_ckpt.cli import main
from llava_ckpt.convert import convert
from llava_ckpt.io.files import sha256_file
from llava_ckpt.io.readers import read_index
from llava_ckpt.verify import verify

from test_verify_proof import flip

TOKENS = 2


@pytest.fixture()
def verified(tiny, tmp_path):
    """A tp-2 output verified in full (the record written), and a copy of the source it was verified against."""
    src = str(tmp_path / "hf")
    shutil.copytree(tiny, src)
    out = str(tmp_path / "ms")
    convert(src, out, fmt="safetensors", tp=2, progress=False)
    r = verify(src, out, max_new_tokens=TOKENS, msrun=False)
    assert r["passed"]
    return src, out, r


def test_a_passing_verify_writes_what_it_proved(verified):
    src, out, r = verified
    path = os.path.join(out, "verification.json")
    assert r["record"] == path
    assert [n for n in os.listdir(out) if n.startswith(".")] == []  # written through a temp file, renamed
    rec = json.load(open(path))
    assert (rec["tool"], rec["record"], rec["verdict"], rec["kind"], rec["weights_only"]) == \
        ("llava-ckpt", "verification", "passed", None, False)
    assert rec["version"] and rec["written"].endswith("Z")
    ms_files = {f["path"]: f["sha256"] for f in rec["ms_dir"]["files"]}
    assert {"manifest.json", "rank_0/llava.safetensors", "rank_1/llava.safetensors", "strategy.ckpt",
            "config.json"} <= set(ms_files) and "verification.json" not in ms_files
    assert all(sha256_file(os.path.join(out, rel)) == sha for rel, sha in ms_files.items())
    assert rec["ms_dir"]["manifest_mismatch"] == []
    src_files = {f["name"]: f["sha256"] for f in rec["source"]["files"]}
    assert {"config.json", "model-00001-of-00003.safetensors", "tokenizer.json"} <= set(src_files)
    assert all(sha256_file(os.path.join(src, n)) == sha for n, sha in src_files.items())
    assert rec["image"]["sha256"] == sha256_file(rec["image"]["path"])
    assert "<image>" in rec["prompt"] and rec["max_new_tokens"] == TOKENS
    assert (rec["compute_dtype"], rec["tp"], rec["stored_dtypes"]) == ("float32", 2, ["float16"])
    assert rec["tolerances"] == r["thresholds"]
    assert rec["weight_proof"]["passed"] and rec["weight_proof"]["tensors"] == r["weights"]["tensors"]
    assert [m["name"] for m in rec["modules"]] == [m["name"] for m in r["modules"]]
    assert rec["greedy"]["tokens_hf"] == r["tokens_hf"] and len(rec["greedy"]["tokens_ms"]) == TOKENS
    # the manifest stays the list of what was written: the record is not in it, and check does not flag it
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert "verification.json" not in {f["path"] for f in manifest["files"]}
    c = check(out)
    assert c["ok"] and c["problems"] == []
    assert c["verification"]["status"] == "current" and c["verification"]["verdict"] == "passed"


def test_check_reports_the_record_and_marks_it_stale_after_a_change(verified):
    src, out, _ = verified
    runner = CliRunner()
    ok = runner.invoke(main, ["check", out])
    assert ok.exit_code == 0 and "verification: PASSED" in ok.output and "still applies" in ok.output, ok.output
    as_json = json.loads(runner.invoke(main, ["check", out, "--json"]).stdout)
    assert set(as_json) == {"ok", "checked", "problems", "verification"} and as_json["ok"]
    assert as_json["verification"]["status"] == "current"

    # the source changes under the record: the output's files are intact (check is ok), the record is stale
    weights = os.path.join(src, "model-00003-of-00003.safetensors")
    name = next(n for n in read_index(weights) if n.endswith("lm_head.weight"))
    flip(weights, name, 0)
    stale = check(out)
    assert stale["ok"] and stale["verification"]["status"] == "stale"
    assert stale["verification"]["changed"] == [f"source {weights} changed"]
    flip(weights, name, 0)
    assert check(out)["verification"]["status"] == "current"  # the same bytes again (mtime alone is no change)

    # a rank file changes: check reports the corruption, and the record no longer applies
    rank1 = os.path.join(out, "rank_1", "llava.safetensors")
    flip(rank1, "vision_encoder.ln_post.gamma", 0)
    broken = runner.invoke(main, ["check", out])
    assert broken.exit_code == 1
    assert "verification: STALE, no longer applies: rank_1/llava.safetensors changed" in broken.output
    flip(rank1, "vision_encoder.ln_post.gamma", 0)

    # a file of the output that is gone
    os.unlink(os.path.join(out, "strategy.ckpt"))
    assert "strategy.ckpt is gone" in check(out)["verification"]["changed"]


def test_a_failing_verify_writes_its_record_too(verified):
    src, out, _ = verified
    rank0 = os.path.join(out, "rank_0", "llava.safetensors")
    flip(rank0, "language_model.lm_head.weight", 3)
    r = verify(src, out, weights_only=True)
    assert not r["passed"]
    rec = json.load(open(r["record"]))
    assert (rec["verdict"], rec["kind"], rec["weights_only"]) == ("failed", "conversion error", True)
    assert [d["name"] for d in rec["weight_proof"]["differ"]] == ["language_model.lm_head.weight"]
    assert "modules" not in rec and "image" not in rec
    assert rec["ms_dir"]["manifest_mismatch"] == ["rank_0/llava.safetensors"]  # it no longer is what was written
    c = check(out)
    assert not c["ok"] and c["verification"]["status"] == "current" and c["verification"]["verdict"] == "failed"
    out_text = CliRunner().invoke(main, ["check", out]).output
    assert "verification: FAILED, conversion error (weight proof only" in out_text


def test_a_damaged_record_is_a_problem_and_a_new_output_has_none(verified, tmp_path):
    src, out, _ = verified
    path = os.path.join(out, "verification.json")
    with open(path, "w") as f:
        f.write("{not json")
    c = check(out)
    assert not c["ok"] and any("verification.json is not valid JSON" in p for p in c["problems"])
    convert(src, out, fmt="safetensors", progress=False, overwrite=True)  # written anew: nothing proven about it
    assert not os.path.exists(path) and check(out)["verification"] is None

"""`check`: every listed file re-hashed; damage found and named; hostile manifests refused."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from llava_ckpt.check import check
from llava_ckpt.convert import convert
from llava_ckpt.errors import CheckpointError
from llava_ckpt.io.readers import read_index

EXE = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
SIDE = 10  # config, generation config, tokenizer (5 files), processor (2 files), chat template: copied into OUT


@pytest.fixture(scope="module")
def outputs(tiny, tmp_path_factory):
    base = tmp_path_factory.mktemp("check")
    convert(tiny, str(base / "tp1"), fmt="ckpt", progress=False)
    convert(tiny, str(base / "tp4"), tp=4, fmt="ckpt", progress=False)
    convert(tiny, str(base / "tp2st"), tp=2, fmt="safetensors", progress=False)
    return base


@pytest.fixture
def tp4(outputs, tmp_path):
    shutil.copytree(outputs / "tp4", tmp_path / "tp4")
    return tmp_path / "tp4"


def cli_check(out):
    return subprocess.run([EXE, "check", str(out)], capture_output=True, text=True)


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def edit_manifest(out, fn):
    m = manifest(out)
    fn(m)
    (out / "manifest.json").write_text(json.dumps(m))


# beside the weights and side files: predict_llava.yaml, and for a tp output strategy/ckpt_strategy_rank_0.ckpt too
@pytest.mark.parametrize("name,n_files", [("tp1", 1 + SIDE + 1), ("tp4", 5 + SIDE + 2), ("tp2st", 3 + SIDE + 2)])
def test_clean_output_is_ok(outputs, name, n_files):
    result = check(str(outputs / name))
    assert result == {"ok": True, "checked": n_files, "problems": [], "verification": None}  # never verified
    proc = cli_check(outputs / name)
    assert proc.returncode == 0 and proc.stdout == f"ok: {n_files} files checked in {outputs / name}\n"


def test_flipped_byte_in_rank_2_is_found_and_named(tp4):
    size = os.path.getsize(tp4 / "rank_2" / "llava.ckpt")
    flip(tp4 / "rank_2" / "llava.ckpt", size // 3)
    result = check(str(tp4))
    assert not result["ok"] and result["checked"] == 7 + SIDE
    assert len([p for p in result["problems"] if "corrupted" in p]) == 1
    assert result["problems"][0].startswith("rank_2/llava.ckpt: sha256 ")
    proc = cli_check(tp4)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0].startswith("rank_2/llava.ckpt: sha256 ")
    assert proc.stdout.splitlines()[-1] == f"CORRUPT: {7 + SIDE} files checked in {tp4}"


def test_damage_to_a_replicated_tensor_is_named(tp4):
    replicated = [t["name"] for t in manifest(tp4)["tensors"] if t["split_dim"] is None]
    name = next(n for n in replicated if n.endswith("ln_1.gamma"))
    offset, length = read_index(str(tp4 / "rank_2" / "llava.ckpt"))[name].pieces[0]
    flip(tp4 / "rank_2" / "llava.ckpt", offset + length - 1)
    problems = check(str(tp4))["problems"]
    assert problems[0].startswith("rank_2/llava.ckpt: sha256 ")
    assert problems[1:] == [f"rank_2/llava.ckpt: replicated tensor {name!r} differs from rank_0/llava.ckpt"]


def test_flipped_byte_in_strategy_file(tp4):
    flip(tp4 / "strategy.ckpt", 10)
    assert [p.split(":")[0] for p in check(str(tp4))["problems"]] == ["strategy.ckpt"]


def test_missing_file(tp4):
    (tp4 / "rank_3" / "llava.ckpt").unlink()
    result = check(str(tp4))
    assert result["problems"] == ["rank_3/llava.ckpt: missing"] and result["checked"] == 6 + SIDE
    proc = cli_check(tp4)
    assert proc.returncode == 1 and proc.stdout.startswith("rank_3/llava.ckpt: missing\n")


def test_size_change(outputs, tmp_path):
    out = tmp_path / "tp1"
    shutil.copytree(outputs / "tp1", out)
    with open(out / "llava.ckpt", "ab") as f:
        f.write(b"\0")
    (problem,) = check(str(out))["problems"]
    assert problem.startswith("llava.ckpt: ") and "the manifest says" in problem


def test_unlisted_weight_file(tp4):
    shutil.copyfile(tp4 / "rank_0" / "llava.ckpt", tp4 / "rank_0" / "extra.ckpt")
    (tp4 / "notes.txt").write_text("a note is not a weight file")
    assert check(str(tp4))["problems"] == ["rank_0/extra.ckpt: weight file not listed in the manifest"]


def test_entry_dropped_from_manifest(tp4):
    edit_manifest(tp4, lambda m: m.update(files=[f for f in m["files"] if f["path"] != "rank_1/llava.ckpt"]))
    problems = check(str(tp4))["problems"]
    assert any("does not list rank_1/llava.ckpt" in p for p in problems)
    assert "rank_1/llava.ckpt: weight file not listed in the manifest" in problems


@pytest.mark.parametrize("path", ["../tp4/rank_0/llava.ckpt", "/etc/passwd", "rank_0/../rank_1/llava.ckpt", ""])
def test_manifest_paths_may_not_leave_out(tp4, path):
    edit_manifest(tp4, lambda m: m["files"].append({"path": path, "size": 1, "sha256": "0" * 64}))
    result = check(str(tp4))
    assert not result["ok"] and result["checked"] == 7 + SIDE
    assert result["problems"] == [f"{tp4 / 'manifest.json'}: files[{7 + SIDE}] path {path!r} is not a plain path inside "
                                  f"{tp4}; not opened"]


def test_symlink_out_of_out_is_not_followed(tp4, tmp_path):
    outside = tmp_path / "outside.ckpt"
    (tp4 / "rank_0" / "llava.ckpt").rename(outside)
    (tp4 / "rank_0" / "llava.ckpt").symlink_to(outside)
    (problem,) = check(str(tp4))["problems"]
    assert problem.startswith("rank_0/llava.ckpt: resolves outside")


def test_no_manifest_is_an_error(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        check(tiny)
    proc = cli_check(tiny)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "manifest.json" in proc.stderr and proc.stderr.count("\n") == 1
    proc = cli_check(tmp_path / "nowhere")
    assert proc.returncode == 2 and proc.stderr == f"error: {tmp_path / 'nowhere'} does not exist\n"


def test_manifest_without_files_is_an_error(outputs, tmp_path):
    out = tmp_path / "tp1"
    shutil.copytree(outputs / "tp1", out)
    edit_manifest(out, lambda m: m.pop("files"))
    proc = cli_check(out)
    assert proc.returncode == 2 and "lists no output files" in proc.stderr and proc.stderr.count("\n") == 1


def test_side_files_travel_and_are_checked(tp4, tiny):
    """config, tokenizer, processor and chat template are copied into OUT, listed with sha256, and checked."""
    listed = {f["path"] for f in manifest(tp4)["files"]}
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "chat_template.json"):
        assert name in listed and (tp4 / name).read_bytes() == open(os.path.join(tiny, name), "rb").read()
    with open(tp4 / "tokenizer_config.json", "a") as f:
        f.write(" ")
    (problem,) = check(str(tp4))["problems"]
    assert problem.startswith("tokenizer_config.json: ")

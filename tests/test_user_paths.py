"""Every command as a user types it: run from a working folder with relative paths, trailing slashes, `..`, the
current folder and symlinked folders and files, into folders that already hold something.

Each CLI call here runs in a subprocess whose working folder is the test's own; no path on its command line is
absolute. Every run must succeed (exit 0, nothing on stderr) or, where the folder holds something the command must
not replace, fail with one `error:` line and leave what was there untouched.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_faults import digests

EXE = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
IMAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llava_ckpt", "assets",
                     "default_image.png")


def cli(cwd, *args, ok=True, timeout=300):
    proc = subprocess.run([EXE, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0 and proc.stderr == "", (args, proc.returncode, proc.stderr)
    return proc


def files_but_manifest(folder: Path) -> dict:
    """digests() without manifest.json, which records the input path as it was typed, and verification.json,
    which a verify of the folder leaves."""
    return {k: v for k, v in digests(folder).items() if k not in ("manifest.json", "verification.json")}


def refused(proc, *words):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)


@pytest.fixture(scope="module")
def work(tiny, tmp_path_factory):
    """A user's working folder: the checkpoint copied in as `hf`, converted as `out` and `out-tp2` with
    relative paths (trailing slash, symlinked source), a symlink to the output and a sub-folder to climb from."""
    w = tmp_path_factory.mktemp("user")
    shutil.copytree(tiny, w / "hf")
    (w / "hf-link").symlink_to("hf")
    (w / "sub").mkdir()
    cli(w, "convert", "hf-link", "out/")
    cli(w / "sub", "shard", "../out", "../out-tp2", "--tp", 2)
    (w / "out-link").symlink_to("out")
    shutil.copyfile(IMAGE, w / "cat.png")
    return w


def test_convert_relative_dot_dot_symlinked_and_into_the_current_folder(work):
    cli(work, "convert", "./hf/", "a")
    cli(work / "sub", "convert", "../hf-link", "../b", "--format", "safetensors")
    here = work / "c"
    here.mkdir()
    cli(here, "convert", "../hf", ".")  # OUT is the current folder: it is swapped for the output
    assert json.loads((work / "c" / "manifest.json").read_text())["source"]["path"] == str(work / "hf")
    assert digests(work / "c") == digests(work / "a")  # the same source, options and command: the same bytes
    assert files_but_manifest(work / "a") == files_but_manifest(work / "out")
    assert (work / "b" / "llava.safetensors").is_file()
    cli(work, "convert", "hf-link", "a")  # the same source through a link: a rerun, replacing its own output
    cli(work / "sub", "make-fixture", "../fx/", "--preset", "tiny", "--seed", 1)
    cli(work, "convert", "fx", "fx-out")
    assert (work / "fx" / "config.json").is_file() and (work / "fx-out" / "llava.safetensors").is_file()


def test_check_and_shard_through_links_and_dot_dot(work):
    for target in ("out", "out/", "out-link", "sub/../out", "out-tp2"):
        proc = cli(work, "check", target)
        assert proc.stdout.startswith("ok: "), proc.stdout
    cli(work, "shard", "out-link/", "tp2-again", "--tp", 2)
    assert files_but_manifest(work / "tp2-again") == files_but_manifest(work / "out-tp2")


@pytest.mark.parametrize("src", ["out/", "out-link", "sub/../out", "out-tp2"])
def test_export_relative_paths(work, src):
    """`export out/ hf/` crashed with a ValueError for any tp-1 output given by a relative path."""
    name = "back-" + src.replace("/", "_").replace(".", "d")
    cli(work, "export", src, name + "/")
    assert (work / name / "model.safetensors.index.json").is_file()
    for f in ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "config.json"):
        assert (work / name / f).read_bytes() == (work / "hf" / f).read_bytes(), (src, f)
    manifest = json.loads((work / name / "manifest.json").read_text())
    assert manifest["source"]["path"] == os.path.abspath(os.path.join(work, src))


def test_verify_and_generate_relative_and_through_links(work):
    proc = cli(work / "sub", "verify", "../hf-link", "../out-link", "--max-new-tokens", 2, "--json")
    assert json.loads(proc.stdout)["passed"]
    proc = cli(work, "verify", "hf", "out-tp2/", "--no-msrun", "--max-new-tokens", 2, "--image", "cat.png",
               "--json")
    assert json.loads(proc.stdout)["passed"]
    (work / "q").mkdir(exist_ok=True)
    shutil.copyfile(IMAGE, work / "q" / "dog.png")
    (work / "q" / "asks.jsonl").write_text(json.dumps({"image": "dog.png", "prompt": "What is it?"}) + "\n")
    (work / "asks-link.jsonl").symlink_to("q/asks.jsonl")
    one = json.loads(cli(work, "generate", "out-link", "--image", "cat.png", "--prompt", "What is it?",
                         "--max-new-tokens", 3, "--json").stdout)
    two = json.loads(cli(work / "sub", "generate", "../out/", "--requests", "../q/asks.jsonl",
                         "--max-new-tokens", 3, "--json").stdout)
    assert one["outputs"][0]["token_ids"] == two["outputs"][0]["token_ids"]  # the same picture, the same answer
    assert two["outputs"][0]["image"] == str(work / "q" / "dog.png")  # relative to the requests file's folder
    # a requests file reached through a link: its images are relative to where the link is
    proc = cli(work, "generate", "out", "--requests", "asks-link.jsonl", "--max-new-tokens", 1, ok=False)
    refused(proc, "image", "dog.png", "does not exist")


def test_folders_that_already_hold_something(work):
    """Nothing that existed is lost without --overwrite; a rerun of the same command replaces its own output."""
    out = digests(work / "out")
    refused(cli(work, "export", "out-tp2", "out", ok=False), "already holds a convert output", "--overwrite")
    refused(cli(work, "convert", "hf", "out", "--tp", 2, ok=False), "tp 1 there, 2 now", "--overwrite")
    refused(cli(work, "shard", "out", "out", "--tp", 2, ok=False), "inside the source checkpoint")
    refused(cli(work, "shard", "out", "out-link", "--tp", 2, ok=False), "inside the source checkpoint")
    refused(cli(work, "convert", "hf", "out", "--dtype", "float32", ok=False), "options.dtype None there")
    assert digests(work / "out") == out
    cli(work, "convert", "hf", "out")  # the same command (hf-link is hf): its own output, replaced quietly
    assert files_but_manifest(work / "out") == {k: v for k, v in out.items()
                                                 if k not in ("manifest.json", "verification.json")}
    assert not (work / "out" / "verification.json").exists()  # what was proven was about the old output

    keep = work / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    for args in (["convert", "hf", "keep"], ["export", "out", "keep"], ["shard", "out", "keep", "--tp", 2],
                 ["convert", "hf", "keep", "--overwrite"]):
        refused(cli(work, *args, ok=False), "holds no llava-ckpt manifest")
    assert os.listdir(keep) == ["notes.txt"]

    nest = work / "nest"
    cli(work, "convert", "hf", "nest")
    shutil.copytree(work / "hf", nest / "hf-inside")
    refused(cli(work, "convert", "nest/hf-inside", "nest", "--overwrite", ok=False),
            "is inside the output folder", "would delete it")
    assert (nest / "hf-inside" / "config.json").is_file()

    repl = work / "repl"
    cli(work, "convert", "hf", "repl")
    cli(work, "export", "out-tp2", "repl", "--overwrite")
    assert json.loads((repl / "manifest.json").read_text())["command"] == "export"
    assert not list(work.glob(".*.partial-*")) and not list(work.glob(".*.old-*"))


def test_outputs_follow_the_umask(tiny, tmp_path):
    for umask, mode in ((0o022, 0o644), (0o002, 0o664)):
        out = tmp_path / f"out-{umask:o}"
        proc = subprocess.run([EXE, "convert", tiny, str(out), "--tp", "2"], capture_output=True, text=True,
                              preexec_fn=lambda u=umask: os.umask(u))
        assert proc.returncode == 0, proc.stderr
        modes = {}
        for root, dirs, files in os.walk(out):
            for name in files:
                modes[os.path.relpath(os.path.join(root, name), out)] = os.stat(os.path.join(root, name)).st_mode & 0o777
            for name in dirs:
                assert os.stat(os.path.join(root, name)).st_mode & 0o777 == mode | 0o111, name
        assert set(modes.values()) == {mode}, modes  # config, tokenizer, manifest and weights alike
        assert {"config.json", "manifest.json", "strategy.ckpt", "rank_0/llava.safetensors"} <= set(modes)

"""Bad input to generate and verify is found before transformers, MindSpore or msrun start.

Each case runs the CLI in a fresh interpreter and, once it has ended with its one `error:` line and exit code 2,
looks at what that interpreter imported: neither `mindspore` nor `transformers` may be among them (importing
transformers alone takes seconds here, MindSpore more). That is what "found first" means, measured without a
clock. Messages name the thing and what it really is.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from llava_ckpt.convert import convert
from llava_ckpt.shard import shard

IMAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llava_ckpt", "assets",
                     "default_image.png")
PROBE = """
import sys
from llava_ckpt.cli import main
sys.argv = ["llava-ckpt"] + sys.argv[1:]
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("mindspore", "transformers", "torch") if m in sys.modules)
print("EXIT", code, "IMPORTED", ",".join(heavy) or "-")
"""


def probe(cwd, *args):
    """(exit code, stderr, heavy modules imported) of one CLI run in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    last = proc.stdout.strip().splitlines()[-1].split()
    return int(last[1]), proc.stderr, last[3]


def refused_early(cwd, args, *words):
    code, err, heavy = probe(cwd, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert heavy == "-", f"{args[:2]}: {heavy} was imported before the error ({err.strip()[:200]})"
    return err


def bomb_png(path, side=20000):
    """A PNG that claims side x side pixels (over PIL's decompression-bomb limit) in a few bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory):
    w = tmp_path_factory.mktemp("first")
    shutil.copytree(tiny, w / "hf")
    convert(str(w / "hf"), str(w / "out"), fmt="ckpt", progress=False)
    shard(str(w / "out"), str(w / "tp2"), tp=2, progress=False)
    shutil.copyfile(IMAGE, w / "cat.png")
    (w / "garbage.png").write_bytes(b"\x89PNG not really" * 10)
    bomb_png(w / "bomb.png")
    (w / "text.png").write_text("hello")
    return w


def _damaged(made, name, edit):
    """A copy of an output with `edit(folder)` applied."""
    dst = made / name
    if not dst.exists():
        shutil.copytree(made / ("tp2" if "tp2" in name else "out"), dst)
        edit(dst)
    return dst


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


LONG = "why " * 5000  # over llava-1.5's 4096 positions whatever the template adds


@pytest.mark.parametrize("case", [
    "missing image", "garbage image", "text as image", "oversized image", "too long prompt",
    "truncated weights", "truncated rank file", "missing rank folder", "HF folder as MS_DIR"])
def test_generate_refuses_before_any_model(made, case):
    q = ["--prompt", "What is it?", "--max-new-tokens", 4]
    if case == "truncated weights":
        target = _damaged(made, "trunc-out", lambda d: _truncate(d / "llava.ckpt"))
    elif case == "truncated rank file":
        target = _damaged(made, "trunc-tp2", lambda d: _truncate(d / "rank_1" / "llava.ckpt"))
    elif case == "missing rank folder":
        target = _damaged(made, "gap-tp2", lambda d: shutil.rmtree(d / "rank_1"))
    else:
        target = "hf" if case == "HF folder as MS_DIR" else "out"
    image = {"missing image": "nowhere.png", "garbage image": "garbage.png", "text as image": "text.png",
             "oversized image": "bomb.png"}.get(case, "cat.png")
    if case == "too long prompt":
        q = ["--prompt", LONG, "--max-new-tokens", 4]
    words = {"missing image": ["nowhere.png", "does not exist"], "garbage image": ["garbage.png", "cannot read"],
             "text as image": ["text.png", "cannot read"], "oversized image": ["bomb.png", "too large"],
             "too long prompt": ["request 1's prompt", "at least", "context of 4096"],
             "truncated weights": ["llava.ckpt", "its manifest records", "truncated"],
             "truncated rank file": ["rank_1/llava.ckpt", "its manifest records", "truncated"],
             "missing rank folder": ["rank_1 missing"],
             "HF folder as MS_DIR": ["is a Hugging Face checkpoint folder", "not an output of llava-ckpt convert"]}
    refused_early(made, ["generate", target, "--image", image, *q], *words[case])


def test_generate_requests_file_is_checked_line_by_line_first(made):
    (made / "asks.jsonl").write_text(json.dumps({"image": "cat.png", "prompt": "a"}) + "\n"
                                     + json.dumps({"image": "cat.png"}) + "\n")
    refused_early(made, ["generate", "out", "--requests", "asks.jsonl"], "asks.jsonl line 2: no 'prompt'")
    (made / "asks2.jsonl").write_text(json.dumps({"image": "cat.png", "prompt": 3}) + "\n")
    refused_early(made, ["generate", "out", "--requests", "asks2.jsonl"], "'prompt' must be text, got int")
    (made / "asks3.jsonl").write_text(json.dumps({"image": "bomb.png", "prompt": "a"}) + "\n")
    refused_early(made, ["generate", "out", "--requests", "asks3.jsonl"], "bomb.png", "too large")


@pytest.mark.parametrize("case", ["swapped", "missing image", "oversized image", "too long prompt",
                                  "truncated rank file", "missing rank folder", "export output as MS_DIR"])
def test_verify_refuses_before_any_model(made, case):
    args = {"swapped": ["out", "hf"], "missing image": ["hf", "out", "--image", "nowhere.png"],
            "oversized image": ["hf", "out", "--image", "bomb.png"],
            "too long prompt": ["hf", "out", "--prompt", LONG],
            "truncated rank file": ["hf", _damaged(made, "trunc-tp2", lambda d: _truncate(d / "rank_1" / "llava.ckpt"))],
            "missing rank folder": ["hf", _damaged(made, "gap-tp2", lambda d: shutil.rmtree(d / "rank_1"))]}
    if case == "export output as MS_DIR":
        from llava_ckpt.export import export
        if not (made / "back").exists():
            export(str(made / "out"), str(made / "back"), progress=False)
        args[case] = ["hf", "back"]
    words = {"swapped": ["out is a llava-ckpt convert output", "did you swap HF_SRC and MS_DIR?"],
             "missing image": ["nowhere.png", "does not exist"], "oversized image": ["bomb.png", "too large"],
             "too long prompt": ["the prompt is at least", "context of 4096"],
             "truncated rank file": ["rank_1/llava.ckpt", "truncated"],
             "missing rank folder": ["records tp 2", "rank_1 missing"],
             "export output as MS_DIR": ["back is an output of llava-ckpt export", "did you swap"]}
    refused_early(made, ["verify", *args[case]], *words[case])


def test_sources_that_are_not_hugging_face_folders_say_what_they_are(made, tmp_path):
    refused_early(made, ["convert", "out", tmp_path / "x"], "out is a llava-ckpt convert output",
                  "llava-ckpt export out HF_OUT")
    refused_early(made, ["export", "hf", tmp_path / "y"], "hf is a Hugging Face checkpoint folder",
                  "`llava-ckpt convert` goes from Hugging Face to MindSpore")
    only_ckpt = tmp_path / "only-ckpt"
    only_ckpt.mkdir()
    shutil.copyfile(made / "hf" / "config.json", only_ckpt / "config.json")
    shutil.copyfile(made / "out" / "llava.ckpt", only_ckpt / "model.ckpt")
    err = refused_early(made, ["convert", only_ckpt, tmp_path / "z"], "no safetensors weights, only model.ckpt",
                        "MindSpore or PyTorch Lightning")
    assert "pickle" not in err

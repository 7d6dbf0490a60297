"""`generate` on the tiny fixture: a batch of three different requests gives transformers' greedy tokens for
each request alone (.ckpt and safetensors, fused and unfused, tp 1 and tp 2 under msrun), the same tokens
one request at a time, reproducible sampling, and one `error:` line for every kind of bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from llava_ckpt.cli import main
from llava_ckpt.convert import convert
from llava_ckpt.generate import generate
from llava_ckpt.model import kernels
from cpu import bf16_lacks

N = 6
QUESTIONS = ["What is this?", "Describe everything you can see in this picture, left to right, in detail.", "Hi"]
SIZES = [(64, 48), (120, 200), (333, 90)]


def converted(src, out, **kw):
    """convert's output holds the source's config, tokenizer, processor and chat template: all generate needs."""
    convert(src, out, progress=False, **kw)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate(SIZES):
        rng = np.random.default_rng(i)
        path = str(folder / f"picture{i}.{'png' if i != 1 else 'jpg'}")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def requests(images):
    return [{"image": i, "prompt": q} for i, q in zip(images, QUESTIONS)]


@pytest.fixture(scope="module")
def expected(tiny, requests):
    """transformers' LlavaForConditionalGeneration.generate(do_sample=False), float32, each request alone."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny)
    out = []
    for r in requests:
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}]
        text = processor.apply_chat_template(chat, add_generation_prompt=True)
        with Image.open(r["image"]) as im:
            batch = processor(images=im.convert("RGB"), text=text, return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(**batch, max_new_tokens=N, do_sample=False)
        out.append({"tokens": seq[0, batch["input_ids"].shape[1]:].tolist(), "text": text,
                    "length": batch["input_ids"].shape[1]})
    assert len({o["length"] for o in out}) == 3  # questions of different lengths
    return out


@pytest.fixture(scope="module")
def tp1(tiny, tmp_path_factory):
    return converted(tiny, str(tmp_path_factory.mktemp("gen") / "tp1"))


@pytest.fixture(scope="module")
def tp2(tiny, tmp_path_factory):
    return converted(tiny, str(tmp_path_factory.mktemp("gen") / "tp2"), fmt="safetensors", fuse_qkv=True, tp=2)


@pytest.mark.parametrize("fmt,fuse,batch_size", [("ckpt", False, 3), ("safetensors", True, 1)])
def test_greedy_batch_matches_transformers(tiny, tmp_path, requests, expected, fmt, fuse, batch_size):
    out = converted(tiny, str(tmp_path / "ms"), fmt=fmt, fuse_qkv=fuse)
    seen = []
    r = generate(out, requests, max_new_tokens=N, batch_size=batch_size,
                 on_batch=lambda batch, done, total, stats: seen.append((len(batch), done, total)))
    assert [o["token_ids"] for o in r["outputs"]] == [e["tokens"] for e in expected]
    sizes = [min(batch_size, 3 - i) for i in range(0, 3, batch_size)]
    assert seen == [(n, sum(sizes[:i + 1]), 3) for i, n in enumerate(sizes)]
    assert r["tp"] == 1 and r["batches"] == len(sizes)
    for o, e, q in zip(r["outputs"], expected, requests):
        assert o["prompt_text"] == e["text"] == f"USER: <image>\n{q['prompt']} ASSISTANT:"
        assert o["image"] == q["image"] and o["prompt"] == q["prompt"]
        assert o["finish_reason"] == "length" and len(o["token_ids"]) == N and o["text"]
    assert r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["decode_tokens"] == 3 * (N - 1)
    if kernels._cpu_supports() is None:  # batches of 2-8 rows decode with the small_matmul kernel here
        assert r["matmul"].startswith("small_matmul kernel ("), r["matmul"]


@pytest.mark.skipif(bool(bf16_lacks()), reason=bf16_lacks() or "runs")
def test_bfloat16_prefill_runs_the_kernels_from_a_working_folder(tp1, requests, expected, tmp_path, monkeypatch):
    """--prefill-matmul bfloat16 through the CLI, relative paths: the prompts' products on bf16_matmul and their
    float32 norms, heads, attention and activations on the fused ops, named in --json; on the tiny model the
    greedy tokens stay transformers' float32 ones (bfloat16's rounding is far from its top-1 margins)."""
    os.symlink(tp1, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    args = ["generate", "model", "--max-new-tokens", str(N), "--json", "--prefill-matmul", "bfloat16"]
    for r in requests:
        args += ["--image", os.path.relpath(r["image"]), "--prompt", r["prompt"]]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert "bf16_matmul kernel" in out["prefill_matmul"] and "fused_ops kernel" in out["prefill_matmul"]
    assert [o["token_ids"] for o in out["outputs"]] == [e["tokens"] for e in expected]


def test_sampling_with_a_seed_repeats(tp1, requests, expected):
    """(That another seed gives other tokens is tests/model/test_batching.py's, on a shared model.)"""
    def run():
        r = generate(tp1, requests, max_new_tokens=N, do_sample=True, temperature=1.5, top_p=0.95, seed=11)
        assert r["seed"] == 11 and r["do_sample"]
        return [o["token_ids"] for o in r["outputs"]]
    a = run()
    assert a == run()
    assert a != [e["tokens"] for e in expected]


def test_cli_text_json_requests_file_and_raw(tiny, tp1, images, requests, expected, tmp_path):
    lines = [json.dumps({"image": os.path.relpath(p, str(tmp_path)), "prompt": q})
             for p, q in zip(images, QUESTIONS)]
    listing = tmp_path / "requests.jsonl"
    listing.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    cli = CliRunner()
    res = cli.invoke(main, ["generate", tp1, "--requests", str(listing), "--max-new-tokens", str(N), "--json",
                            "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["tp"] == 1 and r["batches"] == 2 and {"prefill_s", "decode_tokens_per_s"} <= set(r)
    assert [o["token_ids"] for o in r["outputs"]] == [e["tokens"] for e in expected]
    assert [os.path.realpath(o["image"]) for o in r["outputs"]] == [os.path.realpath(p) for p in images]

    # --raw: the prompts the chat template makes, given whole: same answers; text output, one block each
    from transformers import AutoTokenizer
    decode = AutoTokenizer.from_pretrained(tiny).decode
    args = ["generate", tp1, "--raw", "--max-new-tokens", str(N), "--batch-size", "1"]
    for i in (0, 2):
        args += ["--image", images[i], "--prompt", expected[i]["text"]]
    res = cli.invoke(main, args)
    assert res.exit_code == 0, res.output
    blocks = res.stdout.strip().split("\n\n")
    assert len(blocks) == 2
    for block, i in zip(blocks, (0, 2)):
        lines = block.splitlines()
        assert lines[0] == f"image   : {images[i]}"
        assert lines[1] == "question: " + expected[i]["text"].splitlines()[0]
        answer = decode(expected[i]["tokens"], skip_special_tokens=True).strip()
        assert block.split("answer  : ", 1)[1] == answer + "  [length limit]"
    assert res.stderr == ""  # progress only on a terminal


def _bad_inputs(tmp, images, tp1, tp2, tiny):
    text_file = tmp / "notes.png"
    text_file.write_text("not an image")
    empty = tmp / "empty.jsonl"
    empty.write_text("\n\n")
    broken = tmp / "broken.jsonl"
    broken.write_text(json.dumps({"image": images[0], "prompt": "a"}) + "\n{\"image\": \"x.png\", \n")
    no_prompt = tmp / "no_prompt.jsonl"
    no_prompt.write_text(json.dumps({"image": images[0]}) + "\n")
    gap = tmp / "tp2-gap"
    shutil.copytree(tp2, gap)
    shutil.rmtree(gap / "rank_1")
    q = ["--prompt", "What?"]
    return {
        "missing image": ([tp1, "--image", str(tmp / "nope.png")] + q, "does not exist"),
        "folder as image": ([tp1, "--image", str(tmp)] + q, "is not a file"),
        "not an image": ([tp1, "--image", str(text_file)] + q, "cannot read image"),
        "raw without <image>": ([tp1, "--image", images[0], "--prompt", "What?", "--raw"], "<image>"),
        "raw, one without": ([tp1, "--raw", "--image", images[0], "--prompt", "<image> a", "--image", images[1],
                              "--prompt", "b"], "<image> exactly once"),
        "both kinds": ([tp1, "--requests", str(empty), "--image", images[0]] + q, "not both"),
        "unequal pairs": ([tp1, "--image", images[0], "--image", images[1]] + q, "2 --image and 1 --prompt"),
        "no requests": ([tp1], "no requests"),
        "empty requests file": ([tp1, "--requests", str(empty)], "holds no requests"),
        "malformed line": ([tp1, "--requests", str(broken)], "line 2: not valid JSON"),
        "line without prompt": ([tp1, "--requests", str(no_prompt)], "line 1: no 'prompt'"),
        "not converted": ([tiny, "--image", images[0]] + q, "not an output of llava-ckpt convert"),
        "missing rank": ([str(gap), "--image", images[0]] + q, "records tp 2 (rank_0 .. rank_1): rank_1 missing"),
        "bad top-p": ([tp1, "--image", images[0], "--do-sample", "--top-p", "2"] + q, "top_p"),
    }


def test_bad_input_is_one_error_line(tp1, tp2, tiny, images, tmp_path):
    cli = CliRunner()
    for name, (args, message) in _bad_inputs(tmp_path, images, tp1, tp2, tiny).items():
        res = cli.invoke(main, ["generate"] + args)
        assert res.exit_code == 2, (name, res.output, res.exception)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, res.stderr)
        assert message in lines[0], (name, lines[0])
        assert res.stdout == "", name


def _rank_processes():
    """Every msrun rank process on the machine (the suite runs one test at a time)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "llava_ckpt.runtime.rank" in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.mark.slow
def test_tp2_under_msrun_matches_transformers_and_ctrl_c_leaves_no_rank(tp2, requests, expected, tmp_path):
    seen = []
    r = generate(tp2, requests, max_new_tokens=N, batch_size=2,
                 on_batch=lambda batch, done, total, stats: seen.append(done))
    assert r["tp"] == 2 and seen == [2, 3]
    assert [o["token_ids"] for o in r["outputs"]] == [e["tokens"] for e in expected]
    assert not _rank_processes()

    # Ctrl-C while the ranks run: one error line, exit 2, and no rank (or msrun) process left behind
    cmd = [sys.executable, "-m", "llava_ckpt.cli", "generate", tp2, "--image", requests[0]["image"], "--prompt",
           "Go on.", "--max-new-tokens", "400"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        ranks = _rank_processes()
        if len(ranks) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None and len(ranks) >= 2, "the ranks never started"
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.strip().splitlines()[-1].startswith("error: interrupted"), err
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive and not _rank_processes()

"""Tensor-parallel outputs run as real ranks under msrun (each rank loads only its own rank_<r>/ file) give
the single-process reference model's logits; a damaged rank file does not."""
import os

import numpy as np
import pytest

from llava_ckpt.engine.config import image_token_count, load_config
from llava_ckpt.convert import convert
from llava_ckpt.io import load_tensors
from llava_ckpt.model import Runner, build_and_load, trace_names
from llava_ckpt.verify.converted import open_converted
from llava_ckpt.verify.ranks import run_ranks


def _inputs(cfg):
    rng = np.random.default_rng(1)
    vocab = cfg["text_config"]["vocab_size"]
    text = [t for t in rng.integers(2, vocab, 40) if t != cfg["image_token_index"]]
    ids = np.array([[1] + text[:5] + [cfg["image_token_index"]] * image_token_count(cfg) + text[5:17]], dtype=np.int64)
    vc = cfg["vision_config"]
    pixels = rng.standard_normal((1, vc["num_channels"], vc["image_size"], vc["image_size"])).astype(np.float32)
    return ids, pixels


@pytest.mark.slow
def test_ranks_under_msrun_match_one_process(tiny, tmp_path):
    cfg = load_config(tiny)
    ids, pixels = _inputs(cfg)
    one = str(tmp_path / "tp1")
    convert(tiny, one, fuse_qkv=False, progress=False)
    model, _ = build_and_load(cfg, load_tensors(one))
    runner = Runner(model, jit=False)
    traced = runner.forward(ids, pixels, trace=True)
    ref = traced["logits"]
    scale = float(np.abs(ref).max())
    assert scale > 0
    want_tokens = runner.generate(ids, pixels, 3, first=traced)["tokens"]

    out = str(tmp_path / "tp2-fused")  # the fused layout on the ranks; verify's msrun test runs the unfused one
    convert(tiny, out, fmt="safetensors", fuse_qkv=True, tp=2, progress=False)
    ranks = open_converted(out)
    got = run_ranks(ranks["rank_dirs"], cfg, ranks["layout"], ids, pixels, trace=True, max_new_tokens=3,
                    device="CPU", timeout=240)
    assert got["world"] == 2
    assert got["logits"].shape == ref.shape
    err = float(np.abs(got["logits"] - ref).max())
    assert err <= 1e-4 * scale, (err, scale)
    assert got["tokens"] == want_tokens  # greedy decoding on the ranks: the verify helper's use
    names = trace_names(cfg)
    assert len(got["trace"]) == len(traced["trace"]) == len(names)
    for name, mine, theirs in zip(names, got["trace"], traced["trace"]):
        assert mine.shape == theirs.shape, name
        assert np.abs(mine - theirs).max() <= 1e-4 * max(float(np.abs(theirs).max()), 1e-6), name
    # verify's path through the ranks (default msrun) and a mapping mistake on the ranks are covered by
    # tests/verify/test_verify_msrun.py: one launch here keeps the suite short


def test_kill_run_reaches_ranks_in_their_own_session(tmp_path):
    """msrun starts each rank with setsid: killing msrun's process group alone would leave it running."""
    import subprocess
    import sys
    import time

    import psutil
    from llava_ckpt.runtime.msrun import kill_run

    work = str(tmp_path / "llava-tp-run")
    rank = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', "
            f"{work!r}], start_new_session=True); time.sleep(120)")
    launcher = subprocess.Popen([sys.executable, "-c", rank], start_new_session=True)
    deadline = time.monotonic() + 30
    children = []
    while time.monotonic() < deadline and not children:
        children = psutil.Process(launcher.pid).children()
        time.sleep(0.1)
    assert children and children[0].pid != launcher.pid
    assert os.getpgid(children[0].pid) != os.getpgid(launcher.pid)  # its own session, like msrun's ranks
    kill_run(launcher, work)
    assert launcher.returncode is not None
    assert not psutil.pid_exists(children[0].pid) or children[0].status() == psutil.STATUS_ZOMBIE


def test_msrun_dies_with_a_launcher_killed_outright(tmp_path):
    """The launcher SIGKILLed (no finally runs): the process it started as msrun is killed by the kernel."""
    import subprocess
    import sys
    import time

    import psutil

    marker = str(tmp_path / "msrun-stand-in")
    code = ("import subprocess, sys, time; from llava_ckpt.runtime.msrun import _die_with_launcher; "
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', {marker!r}], "
            "start_new_session=True, preexec_fn=_die_with_launcher); time.sleep(120)")
    launcher = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    child = None
    while time.monotonic() < deadline and child is None:
        child = next((p for p in psutil.Process(launcher.pid).children() if marker in " ".join(p.cmdline())), None)
        time.sleep(0.1)
    assert child is not None
    launcher.kill()
    launcher.wait()
    gone, alive = psutil.wait_procs([child], timeout=10)
    assert not alive


def test_rank_0_progress_is_what_the_timeout_counts_from(tmp_path):
    """A long job (the full 7B's batch) is not a hang: rank 0's ctx.progress() touches the run's PROGRESS file
    and the launcher's clock restarts from it; before any progress there is none to count from."""
    import time
    from llava_ckpt.runtime.msrun import _progress_at
    from llava_ckpt.runtime.rank import _progress
    assert _progress_at(str(tmp_path)) == float("-inf")
    report = _progress(str(tmp_path))
    report()
    first = _progress_at(str(tmp_path))
    assert abs(first - time.monotonic()) < 1.0
    old = time.time() - 100
    os.utime(tmp_path / "progress", (old, old))
    assert 99 < time.monotonic() - _progress_at(str(tmp_path)) < 101
    report(3, 4)  # generate's on_step(n, active) signature
    assert _progress_at(str(tmp_path)) > first - 1.0

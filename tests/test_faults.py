"""kill -9 at several points of `convert` and `convert --tp 4`: never an output that looks complete, and the
rerun of the same command gives the same bytes as a run that was never interrupted. Plus the free-space
check, and determinism (same inputs and options, same bytes, manifest included)."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_ckpt.check import check
from llava_ckpt.convert import convert
from llava_ckpt.errors import CheckpointError

EXE = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
BIG = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
       "num_key_value_heads": 8}  # about 120 MB: long enough a run to kill at chosen points


@pytest.fixture(scope="module")
def big(tiny_factory):
    return tiny_factory(text_overrides=BIG)


def digests(out: Path) -> dict:
    """relative path -> sha256 of every file in OUT (manifest included). predict_llava.yaml names its own folder
    (MindFormers reads absolute paths from it): it is hashed with OUT's path written as <OUT>, and the manifest
    with the yaml's record hashed the same way, so two outputs of the same inputs in two folders compare equal
    and any other difference still shows."""
    found = {}
    here = [os.path.abspath(out), os.path.realpath(out)]
    for root, _, files in os.walk(out):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                data = fh.read()
            rel = os.path.relpath(path, out)
            if rel == "predict_llava.yaml":
                data = _placed(data, here)
            elif rel == "manifest.json":
                manifest = json.loads(data)
                for entry in manifest.get("files", []):
                    if entry.get("path") == "predict_llava.yaml":
                        entry.update(size=None, sha256=hashlib.sha256(_placed(open(os.path.join(out, "predict_llava.yaml"),
                                                                                   "rb").read(), here)).hexdigest())
                data = json.dumps(manifest, sort_keys=True).encode()
            found[rel] = hashlib.sha256(data).hexdigest()
    return found


def _placed(data: bytes, paths) -> bytes:
    text = data.decode("utf-8")
    for p in sorted(set(paths), key=len, reverse=True):
        text = text.replace(p, "<OUT>")
    return text.encode("utf-8")


class Ref:
    def __init__(self, out: Path):
        self.digests = digests(out)
        self.weight_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs
                                if f.startswith("llava."))


@pytest.fixture(scope="module")
def clean(big, tmp_path_factory):
    """Uninterrupted runs, tp 1 and tp 4, each into a folder named `out` (the manifest records the source
    path, not OUT, so every run of the same command writes the same bytes wherever OUT is)."""
    refs = {}
    for tp in (1, 4):
        out = tmp_path_factory.mktemp(f"clean{tp}") / "out"
        proc = subprocess.run([EXE, "convert", big, str(out), "--tp", str(tp)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        refs[tp] = Ref(out)
    return refs


def staged_bytes(out: Path) -> tuple:
    """(number of staging folders beside OUT, bytes in them)."""
    stages = list(out.parent.glob(f".{out.name}.partial-*"))
    total = 0
    for stage in stages:
        for root, _, files in os.walk(stage):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
    return len(stages), total


def kill_when(cmd, out: Path, ready) -> bool:
    """Start `cmd`, SIGKILL it once ready(n_stages, staged bytes) holds; True if it was killed mid-run."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(*staged_bytes(out)):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.001)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def assert_not_complete_looking(out: Path):
    if out.exists():
        names = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs]
        assert names == [], f"{out} holds {names} after a killed run"


# Where to kill: as soon as the staging folder exists; a third of the way; with every weight byte written
# (the writers are fsyncing, the strategy file and the manifest are next).
POINTS = {
    "staged": lambda total: (lambda n, b: n > 0),
    "third": lambda total: (lambda n, b: b >= total // 3),
    "written": lambda total: (lambda n, b: b >= total),
}


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("tp", [1, 4])
def test_kill_9_then_rerun_gives_the_same_bytes(big, clean, tmp_path, tp, point):
    out = tmp_path / "out"
    cmd = [EXE, "convert", big, str(out), "--tp", str(tp)]
    killed = kill_when(cmd, out, POINTS[point](clean[tp].weight_bytes))
    if point != "written":  # the last window is short: on a fast disk the run may finish first
        assert killed, "the run finished before it could be killed"
    if killed:
        assert_not_complete_looking(out)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert digests(out) == clean[tp].digests
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the killed run's staging folder is gone
    assert check(str(out))["ok"]


def test_kill_9_while_replacing_a_previous_output(big, clean, tmp_path):
    """OUT holds an older complete output (tp 1); a tp 4 run into it is killed at several points: OUT is the
    old output or the new one, complete and passing `check` either way, never a mix."""
    out = tmp_path / "out"
    seen = []
    for fraction in (0, 2, 1):  # at once; half the data written; all of it written
        if not out.exists() or digests(out) != clean[1].digests:
            shutil.rmtree(out, ignore_errors=True)
            assert subprocess.run([EXE, "convert", big, str(out)], capture_output=True).returncode == 0
        total = clean[4].weight_bytes
        kill_when([EXE, "convert", big, str(out), "--tp", "4"], out,
                  lambda n, b: n > 0 and (fraction == 0 or b >= total // fraction))
        now = digests(out)
        assert now in (clean[1].digests, clean[4].digests)
        seen.append(1 if now == clean[1].digests else 4)
        assert check(str(out))["ok"]
    assert seen[:2] == [1, 1]


def test_same_inputs_same_bytes(tiny, tmp_path):
    """Determinism in-process too, for every format and option combination used here."""
    for opts in ({}, {"fmt": "safetensors", "tp": 2}, {"dtype": "bfloat16", "fuse_qkv": True, "tp": 4}):
        a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
        a.parent.mkdir()
        b.parent.mkdir()
        convert(tiny, str(a), progress=False, **opts)
        convert(tiny, str(b), progress=False, **opts)
        assert digests(a) == digests(b)
        shutil.rmtree(tmp_path / "a")
        shutil.rmtree(tmp_path / "b")


def test_not_enough_free_space_is_caught_before_writing(tiny, tmp_path, monkeypatch):
    import shutil as shutil_module
    real = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    with pytest.raises(CheckpointError, match="not enough free space in .*: the output needs 0.01 GiB, 0.01 GiB"):
        convert(tiny, str(tmp_path / "out"), progress=False)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: real(p)._replace(free=1 << 40))
    convert(tiny, str(tmp_path / "out"), progress=False)
    assert os.listdir(tmp_path) == ["out"]


def test_signals_wait_until_the_swap_is_done():
    from llava_ckpt.io.output import _signals_deferred
    # Python's own Ctrl-C handler, whatever the test run inherited (a shell starts background jobs with
    # SIGINT ignored, and Python then keeps it ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with _signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                reached.append("after the signal")  # still running: the signal was held
        assert reached == ["after the signal"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_publish_replaces_a_previous_output(tmp_path, monkeypatch, exchange):
    from llava_ckpt.io import output as atomic
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    for version in ("old", "new"):
        stage = Path(atomic.staging_dir(str(out)))
        (stage / "manifest.json").write_text(f'{{"tool": "llava-ckpt", "v": "{version}"}}')
        atomic.publish_dir(str(stage), str(out))
        assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["manifest.json"]
        assert f'"{version}"' in (out / "manifest.json").read_text()


def test_stale_staging_and_old_folders_are_removed(tiny, tmp_path):
    out = tmp_path / "out"
    for stale in (".out.partial-999999", ".out.old-999999"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "manifest.json").write_text("{}")
    convert(tiny, str(out), progress=False)
    assert os.listdir(tmp_path) == ["out"]

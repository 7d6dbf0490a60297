"""The msrun launcher's lifecycle: a killed run takes its ranks (in their own sessions) with it, and the
timeout counts from rank 0's progress. That ranks give transformers' logits, tokens and module outputs is
proven where msrun is used: tests/verify/test_verify_msrun.py (unfused, and a damaged rank file named),
tests/test_family.py (fused, LLaVA-NeXT's packing, Mistral's KV heads split) and tests/test_generate.py."""
import os


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

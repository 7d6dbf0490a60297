"""The msrun launcher: jobs run on a tensor-parallel output's rank folders as N real ranks under msrun.

Each rank (`python -m llava_ckpt.runtime.rank`) reads only its own rank folder; communication is MindSpore's
(mccl backend on CPU). A job names its handler ("module:function", e.g. generate's batch or verify's walk), so
the runtime knows nothing of what the jobs do. The launcher writes the jobs (inputs as .npz, options and the
shared `context` in jobs.json) to a temporary folder, starts msrun on 127.0.0.1 with a free port and collects
rank 0's results as they appear, so a caller can show each one as soon as it is ready.

- A failed or hung run is retried once with the jobs not done yet (a large AllReduce on CPU rarely fails
  and then teardown hangs); a rank that fails on bad input (CheckpointError) is not retried.
- `timeout` is how long the ranks may go without progress: a finished job, or rank 0 touching PROGRESS (a
  handler's ctx.progress(), e.g. generate after every prefill layer and decode step), so a long generate of the
  full 7B is fine, a hang is not.
- At the end, on success, error, timeout or Ctrl-C, every process of the run is killed: msrun's process
  group (msrun, its scheduler), its descendants, and any process whose command line names the run's folder
  (msrun starts each worker in its own session, so a group kill alone misses them). If the launcher itself is
  killed outright, the kernel kills msrun (parent-death signal), and the ranks die with msrun the same way.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..errors import fail

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRESS = "progress"  # the file in the run's folder whose modification time is rank 0's last progress


def rank_threads(world: int) -> int:
    """CPU kernel threads per rank: the cores shared out, so N ranks on one machine do not each start a pool
    the size of the machine (2 ranks x 2 threads on 2 cores ran tp 2 slower than tp 1)."""
    return max(1, (os.cpu_count() or 1) // world)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _msrun() -> list:
    here = os.path.dirname(sys.executable)
    path = os.path.join(here, "msrun")
    if os.path.exists(path):
        return [path]
    return [sys.executable, "-c", "import sys; from mindspore.parallel.cluster.run import main; "
                                  "sys.argv[0] = 'msrun'; sys.exit(main())"]


def _tail(work: str, log_dir: str, limit: int = 3000) -> str:
    """The workers' own error files if any, else the end of the msrun logs."""
    texts = []
    for d in (work, log_dir):
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            if name.startswith("error_rank_") or (d == log_dir and name.endswith(".log")):
                with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                if d == work:  # a worker's traceback: its last line names the problem
                    lines = [line for line in text.splitlines() if line.strip()]
                    text = lines[-1] if lines else text
                texts.append(f"[{name}] " + text[-limit:])
        if texts and d == work:
            break
    return "\n".join(texts)[-2 * limit:]


def _die_with_launcher() -> None:
    """In msrun's process before exec (Linux): SIGKILL it when this launcher dies, even by SIGKILL, so its
    ranks (which die with msrun, see runtime/rank.py) never outlive the run."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def kill_run(proc: subprocess.Popen, work: str) -> None:
    """SIGKILL every process of one msrun run (see the module docstring) and reap msrun."""
    import psutil
    victims = {}
    try:
        for p in psutil.Process(proc.pid).children(recursive=True):
            victims[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(work in part for part in (p.info["cmdline"] or [])):
                victims[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in victims.values():
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    proc.wait()
    psutil.wait_procs(list(victims.values()), timeout=10)


def _read_result(work: str, index: int) -> dict:
    with open(os.path.join(work, f"result_{index}.json"), encoding="utf-8") as f:
        result = json.load(f)
    with np.load(os.path.join(work, f"result_{index}.npz"), allow_pickle=False) as data:
        for key in data.files:
            result[key] = data[key]
    return result


def _progress_at(work: str) -> float:
    """When rank 0 last reported progress, on time.monotonic()'s clock (-inf if it never did)."""
    try:
        age = time.time() - os.stat(os.path.join(work, PROGRESS)).st_mtime
    except OSError:
        return float("-inf")
    return time.monotonic() - max(0.0, age)


def _attempt(world: int, work: str, pending: list, timeout: float, results: dict, on_result):
    """One msrun run over the pending jobs; fills `results` as rank 0 writes them. Returns "" when every
    pending job finished, else a diagnostic."""
    for name in os.listdir(work):
        if name.startswith(("error_rank_", "result_")) and not any(
                name.startswith(f"result_{i}.") for i in results):
            os.remove(os.path.join(work, name))
    log_dir = tempfile.mkdtemp(prefix="logs-", dir=work)
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = _msrun() + [f"--worker_num={world}", f"--local_worker_num={world}", "--master_addr=127.0.0.1",
                      f"--master_port={free_port()}", "--join=True", f"--log_dir={log_dir}",
                      "python", "-m", "llava_ckpt.runtime.rank", work]
    todo = list(pending)
    why = ""
    with open(os.path.join(work, "msrun.out"), "wb") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_launcher)
        try:
            last_progress = time.monotonic()
            while todo:
                if os.path.exists(os.path.join(work, f"result_{todo[0]}.json")):
                    index = todo.pop(0)
                    results[index] = _read_result(work, index)
                    last_progress = time.monotonic()
                    if on_result is not None:
                        on_result(index, results[index])
                    continue
                if any(n.startswith("error_rank_") for n in os.listdir(work)):
                    time.sleep(1.0)  # let the other ranks write theirs
                    why = "a rank failed"
                    break
                if proc.poll() is not None:
                    if os.path.exists(os.path.join(work, f"result_{todo[0]}.json")):
                        continue
                    why = f"msrun exit code {proc.returncode}"
                    break
                last_progress = max(last_progress, _progress_at(work))
                if time.monotonic() - last_progress > timeout:
                    why = f"msrun timed out ({timeout:.0f} s without progress)"
                    break
                time.sleep(0.1)
            if not todo:
                try:  # give the ranks a moment to exit cleanly; teardown on CPU can hang, hence the kill below
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            kill_run(proc, work)
    if not todo:
        return ""
    return f"{why}\n{_tail(work, log_dir)}"


def run_jobs(rank_dirs: list, context: dict, jobs: list, dtype: str = "float32", jit: bool = True,
             device: str = "CPU", timeout: float = 300.0, retries: int = 1, on_result=None) -> dict:
    """Run jobs on one rank per folder of `rank_dirs` (rank r reads rank_dirs[r] only) in one msrun launch.

    jobs: list of {"handler": "module:function", "arrays": {name: np.ndarray}, ...options}; rank r calls
    handler(rank_context, job, arrays) -> (JSON-able result, arrays) for each (runtime/rank.py), and rank 0's
    results come back. `context` (JSON-able) reaches every handler. on_result(index, result) is called in job
    order as each finishes. Returns {"results": list in job order, "world", "seconds", "attempts"}.
    """
    world = len(rank_dirs)
    if world < 2:
        raise fail("running ranks needs a tp > 1 output (two or more rank folders)")
    if not jobs:
        raise fail("no jobs to run")
    if not timeout or timeout <= 0:
        raise fail(f"timeout must be a positive number of seconds, got {timeout!r}")
    work = tempfile.mkdtemp(prefix="llava-tp-")
    t0 = time.perf_counter()
    try:
        specs = []
        for i, job in enumerate(jobs):
            with open(os.path.join(work, f"job_{i}.npz"), "wb") as f:
                np.savez(f, **dict(job["arrays"]))
            specs.append({k: v for k, v in job.items() if k != "arrays"})
        results, errors = {}, []
        for attempt in range(1 + retries):
            pending = [i for i in range(len(jobs)) if i not in results]
            plan = {"dtype": dtype, "jit": bool(jit), "device": device, "package": PACKAGE, "jobs": specs,
                    "pending": pending, "threads": rank_threads(world),
                    "rank_dirs": [os.path.abspath(d) for d in rank_dirs], "context": context}
            with open(os.path.join(work, "jobs.json"), "w", encoding="utf-8") as f:
                json.dump(plan, f)
            why = _attempt(world, work, pending, timeout, results, on_result)
            if not why:
                return {"results": [results[i] for i in range(len(jobs))], "world": world,
                        "attempts": attempt + 1, "seconds": round(time.perf_counter() - t0, 2)}
            errors.append(why)
            if "CheckpointError" in why:  # bad input, not a flaky run: retrying cannot help
                break
        where = os.path.dirname(os.path.abspath(rank_dirs[0]))
        raise fail(f"running {world} ranks of {where} under msrun failed "
                   f"({len(errors)} attempt(s)):\n{errors[-1]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

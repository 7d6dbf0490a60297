"""Run a tensor-parallel output (rank_<r>/ folders) as N real ranks under msrun and return rank 0's logits.

Each rank (tp_worker.py) loads only its own rank_<r>/ file into Megatron-style parallel cells
(model/parallel.py); communication is MindSpore's (mccl backend on CPU). Inputs go to a temporary folder as
.npy files, msrun runs on 127.0.0.1 with a free port, and a failed or hung run is retried once (a large
AllReduce on CPU rarely fails and then teardown hangs).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from .errors import fail

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_worker.py")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rank_count(ms_dir: str) -> int:
    """N for a folder holding rank_0..rank_<N-1>; refuses a tp-1 output or a gap in the numbering."""
    if not os.path.isdir(ms_dir):
        raise fail(f"{ms_dir} is not a folder")
    ranks = sorted(int(d[5:]) for d in os.listdir(ms_dir)
                   if re.fullmatch(r"rank_\d+", d) and os.path.isdir(os.path.join(ms_dir, d)))
    if not ranks:
        raise fail(f"{ms_dir} has no rank_<r>/ folders: running ranks needs a tp > 1 output")
    if ranks != list(range(len(ranks))):
        raise fail(f"{ms_dir}: rank folders are not rank_0..rank_{len(ranks) - 1}")
    return len(ranks)


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


def _attempt(ms_dir: str, world: int, work: str, dtype: str, jit: bool, timeout: float):
    """One msrun run; returns (logits or None, diagnostic text)."""
    for name in os.listdir(work):
        if name.startswith(("error_rank_", "logits")):
            os.remove(os.path.join(work, name))
    log_dir = tempfile.mkdtemp(prefix="logs-", dir=work)
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = _msrun() + [f"--worker_num={world}", f"--local_worker_num={world}", "--master_addr=127.0.0.1",
                      f"--master_port={free_port()}", "--join=True", f"--log_dir={log_dir}",
                      WORKER, os.path.abspath(ms_dir), work, "--dtype", dtype] + ([] if jit else ["--no-jit"])
    with open(os.path.join(work, "msrun.out"), "wb") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            # msrun and its workers share the new session's process group: end exactly that group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    path = os.path.join(work, "logits.npy")
    if os.path.exists(path) and not any(n.startswith("error_rank_") for n in os.listdir(work)):
        return np.load(path), ""
    why = f"timed out after {timeout:.0f} s" if rc is None else f"exit code {rc}"
    return None, f"msrun {why}\n{_tail(work, log_dir)}"


def run_ranks(ms_dir: str, cfg: dict, input_ids, pixel_values, dtype: str = "float32", jit: bool = True,
              timeout: float = 300.0, retries: int = 1) -> dict:
    """Run `ms_dir`'s ranks under msrun on these inputs; returns {"logits", "world", "seconds", "attempts"}.

    `cfg` is the normalized LLaVA config (config.load_config of the HF source). jit=True compiles each rank's
    forward (graph mode, AllReduce/AllGather inside the graph); jit=False runs PyNative. Both were checked
    with communication on CPU.
    """
    world = rank_count(ms_dir)
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise fail(f"input_ids must be [batch, seq], got shape {ids.shape}")
    work = tempfile.mkdtemp(prefix="llava-tp-")
    t0 = time.perf_counter()
    try:
        np.save(os.path.join(work, "input_ids.npy"), ids.astype(np.int32))
        np.save(os.path.join(work, "pixel_values.npy"), np.asarray(pixel_values, dtype=np.float32))
        with open(os.path.join(work, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        errors = []
        for attempt in range(1 + retries):
            logits, why = _attempt(ms_dir, world, work, dtype, jit, timeout)
            if logits is not None:
                return {"logits": logits, "world": world, "attempts": attempt + 1,
                        "seconds": round(time.perf_counter() - t0, 2)}
            errors.append(why)
            if "CheckpointError" in why:  # bad input, not a flaky run: retrying cannot help
                break
        raise fail(f"running {world} ranks of {ms_dir} under msrun failed "
                   f"({len(errors)} attempt(s)):\n{errors[-1]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

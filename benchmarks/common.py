"""Shared helpers for the benchmarks: child-process timing with peak RSS, medians, disk checks."""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LLAVA = [sys.executable, "-m", "llava_ckpt.cli"]


def run(cmd, **kw) -> tuple:
    """(wall seconds, peak RSS in MiB) of a child process; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"benchmark step failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def copy_and_sync(src: str, dst: str) -> float:
    """The baseline, from a cold page cache: `cp -r SRC DST && sync` timed as one step; DST removed after."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    drop_caches()
    seconds, _ = run(["bash", "-c", f"cp -r '{src}' '{dst}' && sync"])
    shutil.rmtree(dst)
    return seconds


def cold_run(cmd, out: str) -> tuple:
    """(seconds, peak RSS MiB) of one command from a cold page cache; its output folder removed after."""
    drop_caches()
    result = run(cmd, cwd=ROOT)
    shutil.rmtree(out, ignore_errors=True)
    return result


def read_floor(src: str) -> tuple:
    """Reading every input byte once (`cat SRC/* > /dev/null`): the least any converter must do; shown beside
    the baseline because `cp -r` + `sync` speed varies a lot with this VM's write-back."""
    drop_caches()
    return run(["bash", "-c", f"cat '{src}'/* > /dev/null"])


def drop_caches() -> bool:
    """Start each run from a cold page cache where the machine allows it (root, not in a locked container)."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def clean_up(outputs, generated: str | None = None) -> None:
    """Remove a benchmark's outputs, and the input it generated unless that is to be kept (None)."""
    for path in tuple(outputs) + ((generated,) if generated else ()):
        shutil.rmtree(path, ignore_errors=True)


def need_free(folder: str, gib: float) -> None:
    free = shutil.disk_usage(folder).free / 2**30
    if free < gib:
        raise SystemExit(f"error: the benchmark needs {gib:.0f} GiB free in {folder}, {free:.0f} GiB is free")


def median(xs):
    return statistics.median(xs)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


SIZES_GIB = {"7b": 13.2, "7b-few-layers": 1.9, "tiny": 0.01, "llava-next-mistral-7b": 14.1, "bakllava-7b": 14.1}


def prepare_input(workdir: str, preset: str, space_factor: float) -> str:
    """The preset's HF fixture in WORKDIR (generated if absent), after checking the disk has room."""
    os.makedirs(workdir, exist_ok=True)
    src = os.path.join(workdir, f"hf-{preset}")
    need_free(workdir, SIZES_GIB[preset] * space_factor)
    if not os.path.isdir(src):
        print(f"generating the {preset} fixture ...", flush=True)
        t, _ = run(LLAVA + ["make-fixture", src, "--preset", preset], cwd=ROOT)
        print(f"  {dir_bytes(src) / 1e9:.2f} GB in {t:.1f} s")
    return src


def add_common_args(ap, preset: str) -> None:
    ap.add_argument("--preset", default=preset, choices=list(SIZES_GIB))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "bench-work"))
    ap.add_argument("--extra", default="", help="extra convert options, e.g. '--fuse-qkv --dtype bfloat16'")
    ap.add_argument("--keep", action="store_true", help="keep the generated input for the next run")


def tree_rss(pid: int) -> int:
    """Bytes resident in a process and all its descendants right now (0 once it is gone)."""
    import psutil
    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def tree_anon(pid: int) -> int:
    """Anonymous bytes resident in a process and all its descendants right now (RssAnon of /proc/PID/status):
    the memory a run really holds. RSS also counts page-cache pages of files it maps, which the kernel can
    drop, so a run that maps a 14 GB checkpoint can show 14 GB of RSS while holding little."""
    import psutil
    try:
        proc = psutil.Process(pid)
        pids = [proc.pid] + [c.pid for c in proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    return sum(tree_anon_one(p) for p in pids)


def run_sampled(cmd, interval: float = 0.05, **kw) -> dict:
    """Run `cmd` to its end, sampling the RSS and the anonymous memory of its whole process tree (msrun ranks
    included) on a thread.

    Returns {"wall_s", "peak_rss_mib", "peak_anon_mib", "peak_anon_per_process_mib" (each process's own
    peak, largest first), "returncode", "stdout", "stderr"}. ru_maxrss would only
    give the largest single process, and a verify under msrun is several."""
    import threading
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    peak = [0]
    anon = [0]
    each = {}  # pid -> its own peak RssAnon (msrun ranks are held to a per-process figure)
    done = threading.Event()

    def sample():
        import psutil
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            anon[0] = max(anon[0], tree_anon(proc.pid))
            try:
                pids = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pids = []
            for pid in pids:
                each[pid] = max(each.get(pid, 0), tree_anon_one(pid))
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    return {"wall_s": time.perf_counter() - start, "peak_rss_mib": peak[0] / 2**20, "peak_anon_mib": anon[0] / 2**20,
            "peak_anon_per_process_mib": sorted((v / 2**20 for v in each.values()), reverse=True),
            "returncode": proc.returncode, "stdout": out, "stderr": err}


def tree_anon_one(pid: int) -> int:
    """RssAnon of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")), 0)
    except OSError:
        return 0

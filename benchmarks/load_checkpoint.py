"""MindSpore's own `ms.load_checkpoint` of what convert writes, at full size, in each format: time and peak
anonymous memory of the loading process, or the error MindSpore gives, for tp 1 and every rank file of tp N.

Each output is converted from the HF fixture and loaded right after converting, as a user would (the page cache
then holds what convert read); a load that succeeds then reads every parameter back (asnumpy) and compares its
bytes with our own reader's. The baseline, in the same session: reading the same file once (`cat FILE >
/dev/null`), the least any loader must do.

Memory is the loading process's anonymous memory (RssAnon), sampled every 50 ms: RSS would also count the pages
of a memory-mapped safetensors file, which the kernel can drop. A load whose anonymous memory passes --cap-gib is
ended (a guard for this shared host, no cgroup needed) and reported as such.

    .venv/bin/python benchmarks/load_checkpoint.py --src HF_7B_DIR --work DIR [--tp 1,2,4,8]
        [--formats safetensors,ckpt] [--lock LOCKFILE]

--lock FILE takes that lock (flock) around each convert + load step, so the machine's other heavy runs wait
for one step, not for the whole benchmark.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import LLAVA, ROOT, need_free, run, tree_anon  # noqa: E402

LOAD = r"""
import json, os, sys, time
import numpy as np
import mindspore as ms
path, fmt = sys.argv[1], sys.argv[2]
free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
start = time.perf_counter()
try:
    params = ms.load_checkpoint(path, format=fmt)
except Exception as exc:
    print(json.dumps({"ok": False, "seconds": time.perf_counter() - start, "free_before": free,
                      "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:400]}"}))
    sys.exit(0)
seconds = time.perf_counter() - start
# then every tensor's bytes as MindSpore hands them out, against our own reader's: what a user of the loaded
# parameters reads (for a memory-mapped file this is where the data is really read)
from llava_ckpt.io.readers import FileReader, read_index
index = read_index(path)
start = time.perf_counter()
differ = []
with FileReader() as reader:
    for name, info in index.items():
        theirs = np.ascontiguousarray(params[name].asnumpy()).reshape(-1).view(np.uint8)
        if not np.array_equal(theirs, reader.read(info).reshape(-1).view(np.uint8)):
            differ.append(name)
print(json.dumps({"ok": True, "seconds": seconds, "free_before": free, "tensors": len(params),
                  "tensors_in_file": len(index), "differ": differ, "read_all_s": time.perf_counter() - start}))
"""


@contextlib.contextmanager
def locked(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def mem_gib(field: str) -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return 0.0


def load(path: str, fmt: str, cap_gib: float) -> dict:
    """One ms.load_checkpoint in a child process, its anonymous memory sampled (and capped)."""
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LOAD, path, fmt], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    peak, killed, done = [0], [False], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_anon(proc.pid))
            if peak[0] > cap_gib * 2**30 and not killed[0]:
                killed[0] = True
                proc.kill()
            done.wait(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    wall = time.perf_counter() - start
    row = {"file_gib": round(os.path.getsize(path) / 2**30, 2), "wall_s": round(wall, 1),
           "peak_anon_gib": round(peak[0] / 2**30, 2)}
    if killed[0]:
        return dict(row, outcome=f"ended at the {cap_gib} GiB cap")
    try:
        got = json.loads(out.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return dict(row, outcome=f"crashed (exit {proc.returncode}): {err.strip().splitlines()[-1:] }")
    row.update(load_s=round(got["seconds"], 1), free_before_gib=round(got["free_before"] / 2**30, 2))
    if got["ok"]:
        row["read_all_s"] = round(got["read_all_s"], 1)
        row["outcome"] = "loaded, every tensor's bytes equal ours" if not got["differ"] and \
            got["tensors"] == got["tensors_in_file"] else f"loaded WRONG: {got['differ'][:4]}"
    else:
        row["outcome"] = "refused: " + got["error"]
    return row


def read_floor(path: str) -> float:
    seconds, _ = run(["bash", "-c", f"cat '{path}' > /dev/null"])
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="an HF folder (make-fixture --preset 7b)")
    ap.add_argument("--work", default=os.path.join(ROOT, "bench-work"))
    ap.add_argument("--tp", default="1,2,4,8")
    ap.add_argument("--formats", default="safetensors,ckpt")
    ap.add_argument("--lock", default=None)
    ap.add_argument("--cap-gib", type=float, default=20.0, help="end a load whose anonymous memory passes this")
    ap.add_argument("--ranks", default="all", help="'all' rank files of a tp output, or 'first'")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    print(f"ms.load_checkpoint at full size on {os.cpu_count()} cores, {mem_gib('MemTotal'):.1f} GiB "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    rows = []
    for fmt in args.formats.split(","):
        for tp in [int(t) for t in args.tp.split(",")]:
            out = os.path.join(args.work, f"ms-{fmt}-tp{tp}")
            with locked(args.lock):
                need_free(args.work, 22 if tp > 1 else 16)
                shutil.rmtree(out, ignore_errors=True)
                t, _ = run(LLAVA + ["convert", args.src, out, "--format", fmt, "--tp", str(tp)], cwd=ROOT)
                print(f"{fmt} tp {tp}: converted in {t:.0f} s; MemFree {mem_gib('MemFree'):.1f} GiB, MemAvailable "
                      f"{mem_gib('MemAvailable'):.1f} GiB", flush=True)
                files = [os.path.join(out, "llava." + fmt)] if tp == 1 else \
                    [os.path.join(out, f"rank_{r}", "llava." + fmt) for r in range(tp)]
                if args.ranks == "first":
                    files = files[:1]
                for path in files:
                    row = load(path, fmt, args.cap_gib)
                    row.update(format=fmt, tp=tp, file=os.path.relpath(path, out))
                    row["read_floor_s"] = round(read_floor(path), 1)
                    row["vs_read_floor"] = round(row["wall_s"] / max(row["read_floor_s"], 1e-3), 1)
                    print("  " + json.dumps(row), flush=True)
                    rows.append(row)
                shutil.rmtree(out)
    print("\nsummary (wall: the loading process from start to end, MindSpore's import included; read floor: "
          "cat of the same file)")
    for r in rows:
        print(f"  {r['format']:11s} tp {r['tp']} {r['file']:26s} {r['file_gib']:6.2f} GiB  {r['outcome'][:110]:110s} "
              f"load {r.get('load_s', '-')} s (+ {r.get('read_all_s', '-')} s reading every tensor), wall "
              f"{r['wall_s']} s ({r['vs_read_floor']}x the read floor), "
              f"peak anon {r['peak_anon_gib']} GiB, free before {r.get('free_before_gib', '-')} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

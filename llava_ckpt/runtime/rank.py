"""One tensor-parallel rank, started by msrun (runtime/msrun.py) as `python -m llava_ckpt.runtime.rank WORK_DIR`.

It reads WORK_DIR/jobs.json: its rank folder is rank_dirs[rank] (it reads nothing else of the checkpoint), and
for each pending job it imports the job's handler ("module:function") and calls handler(ctx, job, arrays),
which returns (JSON-able result, arrays). `ctx` carries the rank, the world size, the rank folder, the caller's
`context`, the plan's dtype / device / jit, `cache`, a dict a handler may keep things in from one job to
the next (a loaded model), and `progress()`, to call as a long job advances (the launcher's timeout counts
from the last call).

Rank 0 writes result_<i>.npz (arrays) then result_<i>.json (the rest; its appearance tells the launcher the
job is done). Every rank that fails writes error_rank_<r>.txt (the launcher reports it).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import traceback
from types import SimpleNamespace


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when msrun (its parent) dies, so an interrupted launcher leaves no rank behind
    (msrun starts each worker in its own session, out of reach of a process-group kill)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was already gone before prctl
        os._exit(1)


def handler_of(spec: str):
    """The function a job names as "package.module:function" (only llava_ckpt's own modules)."""
    from llava_ckpt.errors import fail
    module, _, name = str(spec).partition(":")
    if not module.startswith("llava_ckpt.") or not name:
        raise fail(f"job handler {spec!r} is not a llava_ckpt function")
    return getattr(importlib.import_module(module), name)


def _save(work_dir: str, index: int, meta: dict, arrays: dict) -> None:
    import numpy as np
    base = os.path.join(work_dir, f"result_{index}")
    with open(base + ".tmp.npz", "wb") as f:
        np.savez(f, **arrays)
    os.replace(base + ".tmp.npz", base + ".npz")
    with open(base + ".tmp.json", "w", encoding="utf-8") as f:
        json.dump(meta, f)
    os.replace(base + ".tmp.json", base + ".json")  # last: the launcher's "done" signal


def _progress(work_dir: str):
    """Rank 0's progress report: touches the launcher's PROGRESS file (its timeout counts from the last one)."""
    from llava_ckpt.runtime.msrun import PROGRESS
    path = os.path.join(work_dir, PROGRESS)

    def report(*_):
        with open(path, "a", encoding="utf-8"):
            pass
        os.utime(path)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("work_dir")
    args = ap.parse_args(argv)
    _die_with_parent()
    rank = None
    try:
        import numpy as np
        import mindspore as ms
        from mindspore.communication import init, get_rank, get_group_size
        import llava_ckpt
        from llava_ckpt.errors import fail
        from llava_ckpt.model import kernels
        from llava_ckpt.model.loading import run_ops_blocking, set_device

        with open(os.path.join(args.work_dir, "jobs.json"), encoding="utf-8") as f:
            plan = json.load(f)
        mine = os.path.realpath(os.path.dirname(llava_ckpt.__file__))
        if plan.get("package") and os.path.realpath(plan["package"]) != mine:
            raise fail(f"the ranks import llava_ckpt from {mine}, the launcher from {plan['package']}: "
                       "install the package (pip install -e .) or put it on PYTHONPATH")
        device = plan.get("device", "CPU")
        set_device(device)
        if device == "CPU" and plan.get("threads"):  # first: run_ops_blocking keeps a count already set
            ms.device_context.cpu.op_tuning.threads_num(int(plan["threads"]))
            kernels.set_threads(int(plan["threads"]))
        if device == "CPU":
            run_ops_blocking()  # eager handlers (generate, verify's walk) on CPU: see model/loading.py
        init()
        rank, world = get_rank(), get_group_size()
        if world != len(plan["rank_dirs"]):
            raise fail(f"msrun started {world} ranks for {len(plan['rank_dirs'])} rank folders")
        ctx = SimpleNamespace(rank=rank, world=world, rank_dir=plan["rank_dirs"][rank], context=plan["context"],
                              dtype=plan.get("dtype", "float32"), device=device,
                              jit=bool(plan.get("jit", True)), cache={},
                              progress=_progress(args.work_dir) if rank == 0 else (lambda *_: None))
        for index in plan["pending"]:
            job = plan["jobs"][index]
            with np.load(os.path.join(args.work_dir, f"job_{index}.npz"), allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            meta, out = handler_of(job["handler"])(ctx, job, arrays)
            if rank == 0:
                _save(args.work_dir, index, meta, out)
        del ms
        return 0
    except BaseException:  # noqa: BLE001 - reported to the launcher, then non-zero exit
        name = f"error_rank_{rank if rank is not None else os.environ.get('RANK_ID', 'unknown')}.txt"
        with open(os.path.join(args.work_dir, name), "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())

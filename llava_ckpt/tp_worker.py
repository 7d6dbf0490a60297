"""One tensor-parallel rank, started by msrun (see tp_run.py) as `python -m llava_ckpt.tp_worker MS_DIR WORK_DIR`.

It reads ONLY rank_<r>/ of the converted folder, into the parallel cells (model/parallel.py), and runs the
jobs that WORK_DIR/jobs.json lists as pending, in order:

- "forward" (verify): the prompt's full-vocab logits, optionally every intermediate (trace) and greedy tokens;
  with "streamed" (what verify sends) layer by layer like verify's own walk (verify/streamed.rank_walk:
  one layer's slices in memory at a time), otherwise on the whole rank model;
- "generate": one batch of requests (left-padded), greedy or sampled, as llava_ckpt.generate.run_batch.

The whole rank model is loaded (and compiled) once, when the first job that needs it comes.

Rank 0 writes result_<i>.npz (arrays) then result_<i>.json (the rest; its appearance tells the launcher the
job is done). Every rank that fails writes error_rank_<r>.txt (the launcher reports it).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback


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


def run_job(runner, job: dict, arrays: dict):
    """(JSON-able result, arrays to save) of one job on a loaded Runner; the same code runs at tp 1."""
    import numpy as np
    if job["kind"] == "generate":
        from .generate import run_batch
        return run_batch(runner, arrays, job), {}
    if job["kind"] != "forward":
        from .errors import fail
        raise fail(f"unknown job kind {job['kind']!r}")
    ids, pixels = arrays["input_ids"], arrays["pixel_values"]
    fwd = runner.forward(ids, pixels, trace=bool(job.get("trace")))
    out = {"logits": np.asarray(fwd["logits"], dtype=np.float32)}
    for i, t in enumerate(fwd.get("trace", [])):
        out[f"trace_{i:04d}"] = np.asarray(t, dtype=np.float32)
    meta = {}
    if int(job.get("max_new_tokens", 0)) > 0:
        gen = runner.generate(ids, pixels, int(job["max_new_tokens"]), eos=tuple(job.get("eos", ())), first=fwd)
        meta["tokens"] = [int(t) for t in gen["tokens"]]
    return meta, out


def _streamed_forward(cfg: dict, rank_dir: str, rank: int, world: int, plan: dict, job: dict, arrays: dict):
    """A verify "forward" job, layer by layer (verify.streamed.rank_walk) on this rank's slices."""
    import numpy as np
    from .io import load_tensors
    from .verify.ms_side import MsSide
    from .verify.streamed import rank_walk
    tensors = load_tensors(rank_dir)
    ms = MsSide(cfg, tensors, dtype=plan.get("dtype", "float32"), device_target=plan.get("device", "CPU"),
                rank=rank, world=world)
    new_tokens = int(job.get("max_new_tokens", 0))
    try:
        got = rank_walk(ms, cfg, arrays["input_ids"], arrays["pixel_values"], new_tokens,
                        eos=tuple(job.get("eos", ())), trace=bool(job.get("trace")) and rank == 0)
    finally:
        ms.close()
        tensors.close()
    out = {"logits": np.asarray(got["logits"], dtype=np.float32)}
    out.update({f"trace_{i:04d}": t for i, t in enumerate(got["trace"])})
    meta = {"tokens": got["tokens"]} if new_tokens > 0 else {}
    return meta, out


def _save(work_dir: str, index: int, meta: dict, arrays: dict) -> None:
    import numpy as np
    base = os.path.join(work_dir, f"result_{index}")
    with open(base + ".tmp.npz", "wb") as f:
        np.savez(f, **arrays)
    os.replace(base + ".tmp.npz", base + ".npz")
    with open(base + ".tmp.json", "w", encoding="utf-8") as f:
        json.dump(meta, f)
    os.replace(base + ".tmp.json", base + ".json")  # last: the launcher's "done" signal


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ms_dir")
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
        from llava_ckpt.io import load_tensors
        from llava_ckpt.model import kernels
        from llava_ckpt.model.loading import set_device
        from llava_ckpt.model.llava import Runner
        from llava_ckpt.model.parallel import load_rank

        with open(os.path.join(args.work_dir, "jobs.json"), encoding="utf-8") as f:
            plan = json.load(f)
        mine = os.path.realpath(os.path.dirname(llava_ckpt.__file__))
        if plan.get("package") and os.path.realpath(plan["package"]) != mine:
            raise fail(f"the ranks import llava_ckpt from {mine}, the launcher from {plan['package']}: "
                       "install the package (pip install -e .) or put it on PYTHONPATH")
        set_device(plan.get("device", "CPU"))
        if plan.get("device", "CPU") == "CPU" and plan.get("threads"):
            ms.device_context.cpu.op_tuning.threads_num(int(plan["threads"]))
            kernels.set_threads(int(plan["threads"]))
        init()
        rank, world = get_rank(), get_group_size()
        rank_dir = os.path.join(args.ms_dir, f"rank_{rank}")
        if not os.path.isdir(rank_dir):
            raise fail(f"{rank_dir} does not exist (world size {world})")
        if os.path.isdir(os.path.join(args.ms_dir, f"rank_{world}")):
            raise fail(f"{args.ms_dir} has more than {world} rank folders")
        with open(os.path.join(args.work_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        runner = None
        for index in plan["pending"]:
            job = plan["jobs"][index]
            with np.load(os.path.join(args.work_dir, f"job_{index}.npz"), allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            if job["kind"] == "forward" and job.get("streamed"):
                meta, out = _streamed_forward(cfg, rank_dir, rank, world, plan, job, arrays)
            else:
                if runner is None:
                    tensors = load_tensors(rank_dir)
                    try:
                        model = load_rank(cfg, tensors, rank, world, plan.get("dtype", "float32"))
                    finally:
                        if hasattr(tensors, "close"):
                            tensors.close()
                    runner = Runner(model, jit=bool(plan.get("jit", True)))
                meta, out = run_job(runner, job, arrays)
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

"""One tensor-parallel rank, started by msrun (see tp_run.py): loads ONLY rank_<r>/ of the converted folder,
runs the parallel forward, and rank 0 writes the full-vocab logits of every prompt position.

    msrun ... tp_worker.py MS_DIR WORK_DIR [--dtype float32] [--no-jit]

WORK_DIR holds config.json, input_ids.npy, pixel_values.npy; rank 0 writes logits.npy there, every rank
that fails writes error_rank_<r>.txt (the launcher reports it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ms_dir")
    ap.add_argument("work_dir")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-jit", action="store_true")
    args = ap.parse_args(argv)
    rank = None
    try:
        import numpy as np
        import mindspore as ms
        from mindspore.communication import init, get_rank, get_group_size
        from llava_ckpt.errors import fail
        from llava_ckpt.io import load_tensors
        from llava_ckpt.model.loading import set_device
        from llava_ckpt.model.llava import Runner
        from llava_ckpt.model.parallel import load_rank

        set_device("CPU")
        init()
        rank, world = get_rank(), get_group_size()
        rank_dir = os.path.join(args.ms_dir, f"rank_{rank}")
        if not os.path.isdir(rank_dir):
            raise fail(f"{rank_dir} does not exist (world size {world})")
        if os.path.isdir(os.path.join(args.ms_dir, f"rank_{world}")):
            raise fail(f"{args.ms_dir} has more than {world} rank folders")
        with open(os.path.join(args.work_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        tensors = load_tensors(rank_dir)
        try:
            model = load_rank(cfg, tensors, rank, world, args.dtype)
        finally:
            if hasattr(tensors, "close"):
                tensors.close()
        ids = np.load(os.path.join(args.work_dir, "input_ids.npy"))
        pixels = np.load(os.path.join(args.work_dir, "pixel_values.npy"))
        logits = Runner(model, jit=not args.no_jit).forward(ids, pixels)["logits"]
        if rank == 0:
            tmp = os.path.join(args.work_dir, "logits.tmp.npy")
            np.save(tmp, logits.astype(np.float32))
            os.replace(tmp, os.path.join(args.work_dir, "logits.npy"))
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

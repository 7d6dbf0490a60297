"""Distributed training checkpoints made the way MindSpore training saves them, for tests: rank_<r>/ folders of
MindSpore's own .ckpt files (ms.save_checkpoint) with optimizer state and step counters beside the weights, and
per-stage strategy files in MindSpore's own protobuf classes (ms.train.node_strategy_pb2). The slicing is
tests/oracles.py's, written independently of the package. Never imported by the package."""
import os

import numpy as np

from oracles import DIM, rank_slice


def tensors_and_kinds(output) -> tuple:
    """({name: array}, {name: split kind}) of a tp-1 convert output, in its manifest's (convert's) order."""
    import json
    from llava_ckpt.io import load_tensors
    manifest = json.loads((output / "manifest.json").read_text())
    lazy = load_tensors(str(output))
    return ({e["name"]: np.asarray(lazy[e["name"]]) for e in manifest["tensors"]},
            {e["name"]: e["split"] for e in manifest["tensors"]})


def training_source(hf, tmp_path, fmt="ckpt", **layout):
    """The converted tensors of the HF checkpoint `hf` (in convert's order) saved as distributed training would
    save them (write_training_checkpoint's `layout`), in tmp_path/train, its config.json beside the rank
    folders. tmp_path/one holds the tp-1 convert output they came from."""
    from llava_ckpt.convert import convert
    one = tmp_path / "one"
    if not one.exists():
        convert(hf, str(one), fmt=fmt, progress=False)
    tensors, kinds = tensors_and_kinds(one)
    train = tmp_path / "train"
    write_training_checkpoint(str(train), tensors, kinds, fmt=fmt, **layout)
    (train / "config.json").write_bytes((one / "config.json").read_bytes())
    return train


def is_cut(array, kind, mp) -> bool:
    return mp > 1 and DIM.get(kind) is not None and DIM[kind] < array.ndim


def opt_applies(array, kind, mp, opt) -> bool:
    """Optimizer parallelism slices a weight only where its tensor-parallel piece divides by the group size."""
    if opt <= 1 or array.ndim == 0:
        return False
    rows = array.shape[0] // (mp if is_cut(array, kind, mp) and DIM[kind] == 0 else 1)
    return rows % opt == 0


def training_piece(array, kind, dp, mp, opt, rank) -> np.ndarray:
    """What rank `rank` of a pipeline stage of dp x mp devices (rank = d * mp + m, dev_matrix [dp, mp]) saves
    of `array`: the tensor-parallel block of coordinate m, and under optimizer parallelism of size `opt` the
    part-th of `opt` equal blocks of that along dim 0, part being d % opt for a tensor cut across the mp axis
    and rank % opt for one that is not (the innermost devices first)."""
    d, m = divmod(rank, mp)
    piece = array[rank_slice(array.shape, kind, mp, m)] if is_cut(array, kind, mp) else array
    if opt_applies(array, kind, mp, opt):
        part = d % opt if is_cut(array, kind, mp) else rank % opt
        n = piece.shape[0] // opt
        piece = piece[part * n:(part + 1) * n]
    return np.ascontiguousarray(piece)


def _layout(ms, array, kind, dp, mp, opt):
    from mindspore.train import node_strategy_pb2 as pb
    layout = pb.ParallelLayouts()
    layout.dev_matrix.add().dim.extend([dp, mp])
    tmap = [-1] * array.ndim
    if is_cut(array, kind, mp):
        tmap[DIM[kind]] = 0
    layout.tensor_map.add().dim.extend(tmap)
    layout.param_split_shape.add()
    layout.indices_offset.add()
    layout.field = 0
    cut = opt_applies(array, kind, mp, opt)
    layout.opt_weight_shard_size = opt if cut else 0
    layout.opt_weight_shard_step = (mp if is_cut(array, kind, mp) else 1) if cut else 0
    return layout, [mp if t == 0 else 1 for t in tmap]


def write_training_checkpoint(folder, tensors: dict, kinds: dict, dp=1, mp=2, stages=1, opt=1, step=(3, 10),
                              strategy="folder", optimizer=True, fmt="ckpt"):
    """rank_<r>/llava_rank_<r>-<epoch>_<step>.<fmt> for r < stages * dp * mp and the strategy of each stage:
    `strategy` "folder" (strategy/ holding one file per stage, as MindFormers keeps them), "files" (one
    *strategy*.ckpt per stage beside the rank folders) or "merged" (ms.merge_pipeline_strategys of them, one
    file). Stage s holds the s-th contiguous run of `tensors` (in order). Returns the per-stage file paths."""
    import mindspore as ms
    from mindspore.train import node_strategy_pb2 as pb
    names = list(tensors)
    per = dp * mp
    bounds = [len(names) * s // stages for s in range(stages + 1)]
    os.makedirs(folder, exist_ok=True)
    stage_files = []
    for s in range(stages):
        mine = names[bounds[s]:bounds[s + 1]]
        smap = pb.ParallelStrategyMap()
        smap.current_stage = s
        for name in mine:
            layout, pieces = _layout(ms, tensors[name], kinds[name], dp, mp, opt)
            item = smap.parallel_strategy_item.add()
            item.node_name = name
            item.parallel_strategys.stage = s
            item.parallel_strategys.parallel_strategy.add().dim.extend(pieces)
            litem = smap.parallel_layout_item.add()
            litem.param_name = name
            litem.parallel_layouts.CopyFrom(layout)
        where = os.path.join(folder, "strategy") if strategy == "folder" else folder
        os.makedirs(where, exist_ok=True)
        path = os.path.join(where, f"ckpt_strategy_rank_{s * per}.ckpt" if strategy == "folder"
                            else f"stage{s}_strategy.ckpt")
        with open(path, "wb") as f:
            f.write(smap.SerializeToString())
        stage_files.append(path)
        for local in range(per):
            r = s * per + local
            params = [{"name": n, "data": ms.Tensor(training_piece(tensors[n], kinds[n], dp, mp, opt, local))}
                      for n in mine]
            if optimizer:
                for n in mine[:3]:
                    piece = training_piece(tensors[n], kinds[n], dp, mp, opt, local)
                    params.append({"name": f"adam_m.{n}", "data": ms.Tensor(np.zeros(piece.shape, np.float32))})
                    params.append({"name": f"adam_v.{n}", "data": ms.Tensor(np.ones(piece.shape, np.float32))})
                params.append({"name": "global_step", "data": ms.Tensor(np.array([step[1]], np.int32))})
            rank_dir = os.path.join(folder, f"rank_{r}")
            os.makedirs(rank_dir, exist_ok=True)
            ms.save_checkpoint(params, os.path.join(rank_dir, f"llava_rank_{r}-{step[0]}_{step[1]}.{fmt}"),
                               format=fmt)
    if strategy == "merged":
        merged = os.path.join(folder, "merged_strategy.ckpt")
        _merge(ms, stage_files, merged)
        for p in stage_files:
            os.remove(p)
    return stage_files


def _merge(ms, files, merged):
    """ms.merge_pipeline_strategys takes a folder of strategy files: give it one holding just these."""
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for p in files:
            shutil.copy(p, tmp)
        ms.merge_pipeline_strategys(tmp, merged)

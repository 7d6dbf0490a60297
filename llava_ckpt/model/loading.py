"""Put checkpoint tensors into the model one at a time (cast per tensor), never holding the model twice."""
from __future__ import annotations

from typing import Mapping

import numpy as np
from mindspore import Parameter, Tensor
from mindspore.common.initializer import initializer

from ..engine.config import model_title
from ..errors import fail
from ..io.readers import FileReader
from ..engine.mapping import detect_options, is_unused, load_table, table_for, unused_names
from .layers import NP_DTYPES, stored_dtype_owners


def _table(cfg: dict | None = None, table: dict | None = None) -> dict:
    return table or (table_for(cfg) if cfg else load_table())


def detect_fused(names, table: dict | None = None) -> bool:
    """True for the --fuse-qkv layout (w_qkv / w_gate_hidden), False for wq/wk/wv and w1/w3: the mapping
    table says which targets only the fuse_qkv option produces."""
    return detect_options(_table(table=table), names).get("fuse_qkv", False)


def ignored_names(cfg: dict, names, table: dict | None = None) -> list:
    """Names a converted checkpoint may hold that LLaVA never uses: the table's [unused] (ln_post, which
    MindFormers' LlavaVlm builds but never applies, and the vision layers past the feature layer, which it does
    not build). The reference model builds neither."""
    unused = unused_names(_table(cfg, table), cfg)
    return [n for n in names if is_unused(n, unused)]


def _short(names, limit=6) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def name_mismatch(cfg: dict, params, names) -> str | None:
    """'missing N: ...; unexpected M: ...' when checkpoint `names` and the model's `params` differ (besides the
    table's unused tensors, which a checkpoint may hold), else None. Checked before any weight is read."""
    names = list(names)
    skip = set(ignored_names(cfg, names))
    have = set(names)
    missing = [n for n in params if n not in have]
    unexpected = [n for n in names if n not in params and n not in skip]
    parts = ([f"missing {len(missing)}: {_short(missing)}"] if missing else []) + \
            ([f"unexpected {len(unexpected)}: {_short(unexpected)}"] if unexpected else [])
    return "; ".join(parts) or None


def _sixteen_bit() -> dict:
    import mindspore as ms
    return {"float16": ms.float16, "bfloat16": ms.bfloat16}


def put_stored(cell, attr: str, value: np.ndarray) -> None:
    """`value` (the compute dtype or 16-bit; a map of its file where it can be) as the parameter `cell.attr`,
    no copy, in its own dtype: a lazy parameter of that dtype takes the declared one's place, then its data is
    set. (Parameter(tensor) copies the tensor; Parameter.set_dtype on a lazy one first fills and casts a zero
    tensor, ~60 ms a 7B matrix, which was 20 s of generate's load.)"""
    declared = getattr(cell, attr)
    dtype = _sixteen_bit().get(str(value.dtype))
    if dtype is not None and declared.dtype != dtype:
        declared = Parameter(initializer("zeros", declared.shape, dtype), name=declared.name, requires_grad=False)
        setattr(cell, attr, declared)
    declared.set_data(Tensor.from_numpy(value))


def load_weights(model, tensors: Mapping[str, np.ndarray], stored: bool = False) -> dict:
    """Copy every tensor into the parameter of the same name, cast to the model's compute dtype.

    `tensors` may be lazy (mmap views, bfloat16 via ml_dtypes, float16): each value is read, cast and handed
    to MindSpore on its own, so the peak is the model plus one tensor. Returns {name: stored numpy dtype}.
    stored=True (generate's layout): the big matrices (layers.stored_dtype_params) keep their stored dtype when
    it is 16-bit or the compute dtype, as a map of the file where `tensors` can give one (LazyTensors.mapped:
    no copy, page cache rather than this process's memory; its page tables filled now, FileReader.populate), else
    read once in that dtype; the model widens 16-bit ones as it computes.
    """
    params = {p.name: p for p in model.get_parameters()}
    names = list(tensors.keys())
    mismatch = name_mismatch(model.cfg, params, names)
    if mismatch:
        hint = ""
        if detect_fused(names) != model.fused:
            hint = " (the checkpoint uses the " + ("fused --fuse-qkv" if detect_fused(names) else "unfused") + \
                   " layout, the model was built for the other one)"
        raise fail(f"checkpoint does not match the {model_title(model.cfg)} model: " + mismatch + hint)
    target = NP_DTYPES[model.dtype]
    keep = stored_dtype_owners(model) if stored else {}
    mapper = getattr(tensors, "mapped", None)
    sixteen = _sixteen_bit()
    dtypes = {}
    for name, p in params.items():
        value = mapper(name) if name in keep and mapper is not None else None
        mapped = value is not None
        value = tensors[name] if value is None else value
        dtypes[name] = str(value.dtype)
        if tuple(value.shape) != tuple(p.shape):
            raise fail(f"{name}: checkpoint shape {tuple(value.shape)}, the config needs {tuple(p.shape)}")
        if value.dtype.kind not in "fV" and str(value.dtype) != "bfloat16":
            raise fail(f"{name}: dtype {value.dtype} is not a float type")
        same = value.dtype == target
        if name in keep and (mapped or not same) and (same or str(value.dtype) in sixteen):
            if mapped:
                FileReader.populate(value)
            put_stored(*keep[name], value)  # no copy: the map (or the one read) is the parameter
        else:
            p.set_data(Tensor(np.ascontiguousarray(np.asarray(value).astype(target, copy=False))))
        del value
    return dtypes


def build_and_load(cfg: dict, tensors: Mapping[str, np.ndarray], dtype: str = "float32",
                   device_target: str = "CPU", stored: bool = False):
    """Detect the layout from the names, build the model for it, fill it (`stored`: see load_weights).
    Returns (model, stored dtypes)."""
    from .llava import LlavaVlm
    set_device(device_target)
    model = LlavaVlm(cfg, dtype=dtype, fused=detect_fused(tensors.keys()))
    dtypes = load_weights(model, tensors, stored)
    return model, dtypes


def run_ops_blocking() -> None:
    """Eager (PyNative) ops run on the calling thread instead of an asynchronous queue. With the queue every
    read of a tensor's shape or dtype waits for a thread hand-off: a 7B-width decode step measured 3-4x slower
    that way (2 layers: 224 ms queued, 57-78 ms blocking), and a prefill's big ops gain nothing from it.

    MindSpore's own CPU kernels (the adds, gathers, concats between the kernels' ops) get one thread, unless
    this process chose a count already: after each op split over its pool, the pool's threads spin on
    sched_yield for 300000 turns before they sleep, so with one such op every few milliseconds they never slept
    and took ~9 s of the 2 cores during a 7B bfloat16 prefill (perf: ActorThread_0 13% of the samples), ~2.5 s of
    its 26 s wall. Its MatMul (a float32 prefill's) runs on the pool's threads as before (measured unchanged)."""
    import mindspore as ms
    ms.runtime.launch_blocking()
    try:
        ms.device_context.cpu.op_tuning.threads_num(1)
    except RuntimeError:  # already set in this process (by an earlier call, or by the caller: theirs stands)
        pass


def synchronize() -> None:
    """Wait for MindSpore's queued work (its ops may run asynchronously). MindSpore 2.10's public
    `ms.runtime.synchronize` logs "[ERROR] ... CPU device is not supported" on CPU and skips its first call
    without synchronizing; this is the call it makes once past that check."""
    from mindspore._c_expression import synchronize as synchronize_all
    synchronize_all()


def set_device(device_target: str) -> None:
    """CPU for tests here; Ascend (or GPU) is where the 7B model is meant to run."""
    import mindspore as ms
    if ms.get_context("device_target") != device_target:
        if hasattr(ms, "set_device"):
            ms.set_device(device_target)
        else:
            ms.set_context(device_target=device_target)

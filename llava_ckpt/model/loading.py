"""Put checkpoint tensors into the model one at a time (cast per tensor), never holding the model twice."""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np
from mindspore import Tensor

from ..errors import fail
from .layers import NP_DTYPES
from .vision import layers_run

FUSED_MARKERS = (".attention.w_qkv.weight", ".feed_forward.w_gate_hidden.weight")


def detect_fused(names) -> bool:
    """True for the --fuse-qkv layout (w_qkv / w_gate_hidden), False for wq/wk/wv and w1/w3."""
    return any(n.endswith(FUSED_MARKERS) for n in names)


def ignored_names(cfg: dict, names) -> list:
    """Names a converted checkpoint may hold that LLaVA never uses: ln_post and resblocks past the feature
    layer (MindFormers' LlavaVlm does not build them either)."""
    first_unused = layers_run(cfg)
    n_layers = cfg["vision_config"]["num_hidden_layers"]
    out = []
    for name in names:
        if name.startswith("vision_encoder.ln_post."):
            out.append(name)
            continue
        m = re.match(r"vision_encoder\.transformer\.resblocks\.(\d+)\.", name)
        if m and first_unused <= int(m.group(1)) < n_layers:
            out.append(name)
    return out


def _short(names, limit=6) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_weights(model, tensors: Mapping[str, np.ndarray]) -> dict:
    """Copy every tensor into the parameter of the same name, cast to the model's compute dtype.

    `tensors` may be lazy (mmap views, bfloat16 via ml_dtypes, float16): each value is read, cast and handed
    to MindSpore on its own, so the peak is the model plus one tensor. Returns {name: stored numpy dtype}.
    """
    params = {p.name: p for p in model.get_parameters()}
    names = list(tensors.keys())
    skip = set(ignored_names(model.cfg, names))
    missing = [n for n in params if n not in tensors]
    unexpected = [n for n in names if n not in params and n not in skip]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
        hint = ""
        if detect_fused(names) != model.fused:
            hint = " (the checkpoint uses the " + ("fused --fuse-qkv" if detect_fused(names) else "unfused") + \
                   " layout, the model was built for the other one)"
        raise fail("checkpoint does not match the LLaVA-1.5 model: " + "; ".join(parts) + hint)
    target = NP_DTYPES[model.dtype]
    stored = {}
    for name, p in params.items():
        value = tensors[name]
        stored[name] = str(value.dtype)
        if tuple(value.shape) != tuple(p.shape):
            raise fail(f"{name}: checkpoint shape {tuple(value.shape)}, the config needs {tuple(p.shape)}")
        if value.dtype.kind not in "fV" and str(value.dtype) != "bfloat16":
            raise fail(f"{name}: dtype {value.dtype} is not a float type")
        p.set_data(Tensor(np.ascontiguousarray(np.asarray(value).astype(target, copy=False))))
        del value
    return stored


def build_and_load(cfg: dict, tensors: Mapping[str, np.ndarray], dtype: str = "float32",
                   device_target: str = "CPU"):
    """Detect the layout from the names, build the model for it, fill it. Returns (model, stored dtypes)."""
    from .llava import LlavaVlm
    set_device(device_target)
    model = LlavaVlm(cfg, dtype=dtype, fused=detect_fused(tensors.keys()))
    stored = load_weights(model, tensors)
    return model, stored


def set_device(device_target: str) -> None:
    """CPU for tests here; Ascend (or GPU) is where the 7B model is meant to run."""
    import mindspore as ms
    if ms.get_context("device_target") != device_target:
        if hasattr(ms, "set_device"):
            ms.set_device(device_target)
        else:
            ms.set_context(device_target=device_target)

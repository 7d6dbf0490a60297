"""What a generate run must hold in memory, from the manifest and the requests, before anything is loaded.

generate's layout (model/loading.py load_weights(stored=True), model/llava.py Runner(jit=False)): the big
matrices (Linear weights and embedding tables: the 2-D `*weight` tensors, layers.KEEPS_STORED) stay in the
checkpoint's dtype as maps of its file, so they are page cache, not the process's own memory; a 16-bit one is
widened to float32 inside the decode kernel, or for a prefill's matmul into a temporary that lives for that
one call. Every other tensor (norms, biases, the patch convolution, position embeddings) is cast to the
compute dtype. The KV cache is host memory in the compute dtype; eager prefill holds one layer's
intermediates at a time.

Per rank of `--tp N` (each rank holds 1/N of every split tensor and of the attention heads):
  mapped      sum over the big matrices of (elements on the rank) x itemsize(stored dtype): file pages the
              host must have room to cache (a matrix stored wider than the compute dtype is cast instead and
              counted under weights)
  weights     the other tensors' elements x itemsize(compute dtype): the process's own copy
  widened     the two largest 16-bit matrices in the compute dtype (one in use, the next being made) when
              the compute dtype is wider than the stored one
  kv cache    layers x 2 x B x (kv_heads / N) x T x head_dim x itemsize, T = padded prompt + new tokens
  activations B x S x (4 H + 2 F / N) x itemsize + B x (heads / N) x S^2 x 4 x 2 (float32 scores, probs),
              the vision tower's the same way over its P positions, and the last position's logits B x V x 4
  runtime     RUNTIME_BYTES (MindSpore and numpy imported: about 0.25 GB anonymous, measured)
"total" is the anonymous part (all but mapped): a lower bound of what the process holds, compared with
measured peaks in tests/model/test_memory.py. On a CPU host every rank runs on the same machine, so the host
needs N times a rank's total plus every rank's mapped bytes; generate refuses a run that cannot fit with one
`error:` line and the options that would pass the same formula, instead of being killed by the kernel.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..engine.config import image_token_count
from .anyres import most_patches
from ..engine.mapping import is_unused, table_for, unused_names
from ..engine.splits import rank_shape, valid_degrees
from ..errors import fail

RUNTIME_BYTES = 300 * 1000 ** 2
ENV_AVAILABLE = "LLAVA_CKPT_MEMORY_AVAILABLE"  # bytes; overrides what the host reports (tests, a user's cap)
GIB = 1024 ** 3


def kept_stored(name: str, shape) -> bool:
    """Whether generate keeps this tensor in its stored dtype, mapped from the file: the 2-D `*weight`
    tensors are exactly the Linear weights and embedding tables (layers.KEEPS_STORED; a test holds the two
    rules together), and the rule needs no model built."""
    return len(shape) == 2 and name.endswith("weight")


def weight_bytes(cfg: dict, layout: dict, tp: int, dtype: str, dtypes: dict | None = None) -> dict:
    """One rank's weights by where they live: {"mapped", "weights", "widened"} in bytes (see the module
    docstring). layout: name -> [split kind, whole shape]; dtypes: name -> stored dtype (default float16).
    The table's unused tensors (ln_post, vision layers past the feature layer) are not loaded."""
    unused = unused_names(table_for(cfg), cfg)
    compute = np.dtype(dtype).itemsize
    out = {"mapped": 0, "weights": 0, "widened": 0}
    widened = []
    for name, (kind, shape) in layout.items():
        if is_unused(name, unused):
            continue
        n = math.prod(rank_shape(shape, kind, tp))
        stored = _itemsize((dtypes or {}).get(name, "float16"))
        if kept_stored(name, shape) and stored <= compute:
            out["mapped"] += n * stored
            if stored < compute:
                widened.append(n * compute)
        else:
            out["weights"] += n * compute
    out["widened"] = sum(sorted(widened)[-2:])
    return out


def _itemsize(name: str) -> int:
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def need(cfg: dict, layout: dict, tp: int, batch: int, prompt_len: int, new_tokens: int,
         dtype: str = "float32", weights: dict | None = None, dtypes: dict | None = None) -> dict:
    """The formula's terms in bytes, per rank, and the anonymous ones' sum ("total"). `weights`:
    weight_bytes(cfg, layout, tp, dtype, dtypes), when the caller has counted them already."""
    tc, vc = cfg["text_config"], cfg["vision_config"]
    size = np.dtype(dtype).itemsize
    h, f, layers = tc["hidden_size"], tc["intermediate_size"], tc["num_hidden_layers"]
    heads, kv, d = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
    s, t = prompt_len, prompt_len + new_tokens
    p = image_token_count(cfg) + 1  # the tower runs over the patches and CLS
    images = batch * most_patches(cfg)  # LLaVA-NeXT's tower runs over each image's tiles and base
    vh, vf, vheads = vc["hidden_size"], vc["intermediate_size"], vc["num_attention_heads"]
    terms = dict(weights or weight_bytes(cfg, layout, tp, dtype, dtypes))
    terms.update({
        "kv_cache": layers * 2 * batch * (kv // tp) * t * d * size,
        "activations": (batch * s * (4 * h + 2 * f // tp) * size + batch * (heads // tp) * s * s * 4 * 2
                        + images * p * (4 * vh + 2 * vf // tp) * size + images * (vheads // tp) * p * p * 4 * 2
                        + batch * tc["vocab_size"] * 4),
        "runtime": RUNTIME_BYTES,
    })
    terms["total"] = sum(v for k, v in terms.items() if k != "mapped")
    return terms


def available() -> tuple:
    """(bytes, where from): LLAVA_CKPT_MEMORY_AVAILABLE if set, else the smaller of the host's MemAvailable
    and the room left under this process's cgroup limit."""
    value = os.environ.get(ENV_AVAILABLE)
    if value is not None:
        try:
            return int(value), ENV_AVAILABLE
        except ValueError:
            raise fail(f"{ENV_AVAILABLE} must be a number of bytes, got {value!r}") from None
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            found.append((int(limit) - used, "the cgroup limit"))
    except (OSError, ValueError):
        pass
    return min(found) if found else (None, "unknown")


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB / 10 else f"{n / 1024 ** 2:.1f} MiB"


def check_fits(cfg: dict, layout: dict, tp: int, batches, new_tokens: int, dtype: str, device: str,
               tp_units=(), dtypes: dict | None = None) -> dict:
    """Refuse (one error line: the figures and what would fit) when the largest of `batches` ((rows, padded
    prompt length) pairs) cannot fit this host's memory. `tp_units`: the manifest's (what, size) pairs that
    --tp must divide, for the degrees offered; dtypes: name -> stored dtype (the manifest's). Only CPU runs are
    checked: on a device the weights live in its memory, which this host cannot read. Returns the largest
    batch's terms (per rank), with "host_total" and "available"."""
    counted = {}

    def total(batch, prompt_len, tp=tp, new_tokens=new_tokens, dtype=dtype) -> dict:
        if (tp, dtype) not in counted:
            counted[tp, dtype] = weight_bytes(cfg, layout, tp, dtype, dtypes)
        terms = need(cfg, layout, tp, batch, prompt_len, new_tokens, dtype, counted[tp, dtype])
        return dict(terms, host=terms["total"] + terms["mapped"])

    batch, prompt_len = max(batches, key=lambda b: total(*b)["total"])
    terms = total(batch, prompt_len)
    del terms["host"]
    if device != "CPU":
        return dict(terms, host_total=None, available=None)
    room, origin = available()
    host = (terms["total"] + terms["mapped"]) * tp
    result = dict(terms, host_total=host, available=room)
    if room is None or host <= room:
        return result

    def fits(per_device=False, **kw) -> bool:
        """The run changed by `kw` fits: its ranks on this host, or with per_device one rank per device."""
        kw = {"batch": batch, "prompt_len": prompt_len, **kw}
        return total(**kw)["host"] * (1 if per_device else tp) <= room

    options = []
    if dtype == "float32" and fits(dtype="float16"):
        options.append("--dtype float16")
    smaller = [b for b in range(batch - 1, 0, -1) if fits(batch=b)]
    if smaller:
        options.append(f"--batch-size {smaller[0]}")
    fewer = [n for n in (new_tokens // 2, new_tokens // 4, 16) if 0 < n < new_tokens and fits(new_tokens=n)]
    if fewer:
        options.append(f"--max-new-tokens {fewer[0]}")
    devices = [n for n in valid_degrees(tp_units, limit=64) if n > 1 and n >= tp and fits(per_device=True, tp=n)]
    if devices and devices[0] == tp:
        options.append(f"the {tp} ranks on {tp} devices of this size")
    elif devices:
        options.append(f"shard to --tp {devices[0]} and run the ranks on {devices[0]} devices of this size")
    parts = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in terms.items() if k != "total")
    ranks = f" per rank, x{tp} ranks on this host = {_gib(host)}" if tp > 1 else ""
    need_rank = terms["total"] + terms["mapped"]
    raise fail(f"this run needs at least {_gib(need_rank)}{ranks} ({parts}; {dtype}, batch {batch}, "
               f"{prompt_len}-token prompts, {new_tokens} new tokens), {_gib(room)} is available ({origin}); "
               + ("what would fit: " + "; ".join(options) if options else "no smaller run of these requests fits"))

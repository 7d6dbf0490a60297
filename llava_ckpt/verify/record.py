"""verify's record: the sha256 of every file it is proving things about (hashed on background threads while the
proof and the walk read the same files), and MS_DIR/verification.json written from the result when it is done
(io/verification.py is the file's own home: written, read, and whether it still applies)."""
from __future__ import annotations

import os


def start_hashing(hf_src: str, ms_dir: str, image: str | None = None) -> dict:
    """sha256 of every file the record will name, on background threads while the checks read the same files
    (the page cache serves both): MS_DIR's files, the source's weights and side files, the image."""
    from ..io.hf_folder import read_tensors, side_files
    from ..io.output import HashFiles
    from ..io.verification import output_files
    ms_files = [(rel, os.path.join(ms_dir, rel)) for rel in output_files(ms_dir)]
    _, weights = read_tensors(hf_src)
    src_files = sorted(set(weights) | set(side_files(hf_src)))
    # one thread per side, each keeping pace with the proof's reads of its side (one thread hashing MS_DIR then
    # the source ran ahead on one and behind on the other: 38 s against 26 s for the 7B's weights-only verify)
    threads = [HashFiles([p for _, p in ms_files]), HashFiles([p for _, p in src_files] + ([image] if image else []))]
    for t in threads:
        t.start()
    return {"threads": threads, "ms_files": ms_files, "src_files": src_files, "image": image,
            "hf_src": hf_src, "ms_dir": ms_dir}


def stop_hashing(hashing: dict) -> None:
    """A verify that ends in an error records nothing: its hashing stops too."""
    for thread in hashing["threads"]:
        thread.stop = True


def write_verification(result: dict, hashing: dict, run: dict) -> dict:
    """Write MS_DIR/verification.json (what this verify proved, and the sha256 of every file it was proven on),
    and say where in `result["record"]`; a folder that cannot be written gets `record_error` instead."""
    import time
    from ..io.verification import write_record
    digest = {}
    for thread in hashing["threads"]:
        thread.join()
        if thread.error:
            result.update(record=None, record_error=f"files changed while verify read them ({thread.error})")
            return result
        digest.update(thread.result)
    ms_dir, hf_src = hashing["ms_dir"], hashing["hf_src"]
    ms_files = [{"path": rel, "size": os.path.getsize(p), "sha256": digest[p]} for rel, p in hashing["ms_files"]]
    src_files = [{"name": n, "size": os.stat(p).st_size, "mtime_ns": os.stat(p).st_mtime_ns, "sha256": digest[p]}
                 for n, p in hashing["src_files"]]
    image = hashing["image"]
    weights = dict(result["weights"])
    result["manifest_mismatch"] = _manifest_mismatch(ms_dir, ms_files)
    record = {
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "verdict": "passed" if result["passed"] else "failed",
        "kind": result["kind"],
        "weights_only": bool(result.get("weights_only")),
        "checks": result["checks"],
        "source": {"path": os.path.abspath(hf_src), "files": src_files},
        "ms_dir": {"path": os.path.abspath(ms_dir), "files": ms_files, "manifest_mismatch": result["manifest_mismatch"]},
        "tp": result["tp"], "fused_qkv": result["fused_qkv"], "stored_dtypes": result["stored_dtypes"],
        "weight_proof": weights,
    }
    if not result.get("weights_only"):
        record.update({
            "image": {"path": image, "size": os.path.getsize(image), "sha256": digest[image]},
            "prompt": result["prompt"], "max_new_tokens": run.get("max_new_tokens"), "device": run.get("device"),
            "compute_dtype": result["compute_dtype"], "hf_weights_rounded_to": result["hf_weights_rounded_to"],
            "tolerances": result["thresholds"],
            "logits": {k: result[k] for k in ("max_abs_diff", "max_abs_logit", "rel_diff", "cosine_min",
                                              "top1_agreement")},
            "modules": result["modules"], "first_divergence": result["first_divergence"], "drift": result["drift"],
            "greedy": {k: result[k] for k in ("tokens_hf", "tokens_ms", "greedy_match", "greedy_first_mismatch",
                                              "greedy_equal", "text_hf", "text_ms")},
            "msrun": None if result["msrun"] is None else {k: v for k, v in result["msrun"].items() if k != "modules"},
            "replica_mismatch": result["replica_mismatch"],
        })
    try:
        result["record"] = write_record(ms_dir, record)
    except OSError as exc:
        result.update(record=None, record_error=f"cannot write {ms_dir}: {exc.strerror or exc}")
    return result


def _manifest_mismatch(ms_dir: str, ms_files: list) -> list:
    """Files whose sha256 now differs from what MS_DIR's manifest lists (it was hashed for the record anyway)."""
    from ..io.manifest import NAME, read_manifest
    if not os.path.lexists(os.path.join(ms_dir, NAME)):  # a bare folder: nothing lists what it should hold
        return []
    files = read_manifest(ms_dir).get("files")  # read (and checked) once already, by open_converted
    listed = {f.get("path"): f.get("sha256") for f in files if isinstance(f, dict)} if isinstance(files, list) else {}
    have = {f["path"]: f["sha256"] for f in ms_files}
    return sorted(rel for rel, sha in listed.items() if rel != NAME and have.get(rel) != sha)

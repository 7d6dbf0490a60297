"""The one output transaction: every folder convert, shard and export write appears complete or not at all.

`staged_output` builds OUT in a hidden sibling folder (`.OUT.partial-PID`) after a free-space check, hashes the
inputs on a background thread while the caller streams the weights in, copies the side files (checked against
the input's own record), checks the inputs' hashes against theirs, writes the manifest with the sha256 of every
file, fsyncs and swaps the folder in. A run killed at any point leaves at most `.OUT.partial-PID` (or
`.OUT.old-PID`) beside OUT, which the next run for the same OUT removes; OUT itself is either absent, the
previous complete output, or the new complete output.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import shutil
import signal
import threading

from ..errors import fail
from .files import sha256_file, write_atomic
from .manifest import NAME as MARKER, identity, write_manifest
from .paths import within


def _previous_output(out: str) -> dict | None:
    """The manifest of what OUT holds: {} when OUT is empty, None when it holds something that is not a
    llava-ckpt output (never ours to replace)."""
    if not os.listdir(out):
        return {}
    try:
        with open(os.path.join(out, MARKER), "rb") as f:
            manifest = json.loads(f.read(64 << 20))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("tool") == "llava-ckpt" else None


def describe(manifest: dict) -> str:
    """'a convert output of /src (tp 2, ckpt)' for messages about what a folder holds."""
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    origin = source.get("converted") or source.get("repo_id") or source.get("path")
    layout = ", ".join(f"{k} {manifest[k]}" for k in ("tp", "format") if k in manifest)
    command = str(manifest.get("command", "llava-ckpt"))
    return (f"{'an' if command[:1] in 'aeiou' else 'a'} {command} output" + (f" of {origin}" if origin else "")
            + (f" ({layout})" if layout else ""))


def check_out(out: str, src: str | None = None, job: dict | None = None, overwrite: bool = False) -> None:
    """Refuse an OUT that is a file, is not ours to replace, holds another output than this run's, contains
    or is inside SRC, or cannot be written.

    `job`: this run's identity (io.manifest.identity of what it will record, or part of it). An OUT whose
    manifest has the same is this run's own earlier output and is replaced; any other llava-ckpt output is
    replaced only with `overwrite`. A folder that is not a llava-ckpt output is never replaced."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise fail(f"output {out} exists and is not a folder")
    real_out = os.path.realpath(out)
    if src is not None and os.path.isdir(src) and within(real_out, src):
        raise fail(f"output {out} is inside the source checkpoint {src}")
    if src is not None and os.path.exists(src) and os.path.isdir(out) and within(src, out):
        raise fail(f"the source {src} is inside the output folder {out}: replacing {out} would delete it")
    if os.path.isdir(out):
        previous = _previous_output(out)
        if previous is None:
            raise fail(f"output folder {out} is not empty and holds no llava-ckpt manifest; "
                       "choose an empty or new folder")
        there = identity(previous) if previous else {}
        differs = [f"{key} {there.get(key)!r} there, {value!r} now" for key, value in (job or {}).items()
                   if previous and there.get(key) != value]
        if differs and not overwrite:
            raise fail(f"output folder {out} already holds {describe(previous)}, not this run's output "
                       f"({'; '.join(differs[:3])}): pass --overwrite to replace it, or choose another folder")
    parent = os.path.dirname(real_out) or "."
    if not os.path.isdir(parent):
        what = "is not a folder" if os.path.exists(parent) else "does not exist"
        raise fail(f"the folder that should hold {out} {what}: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise fail(f"cannot write in {parent} (permission denied)")


def _partial_prefix(out: str) -> str:
    real = os.path.realpath(out)
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.partial-")


def staging_dir(out: str, src: str | None = None, job: dict | None = None, overwrite: bool = False) -> str:
    """A fresh hidden folder beside OUT to build the output in (stale ones from killed runs are removed), after
    check_out(out, src, job, overwrite)."""
    check_out(out, src, job, overwrite)
    prefix = _partial_prefix(out)
    old_prefix = prefix[:-len("partial-")] + "old-"
    for stale in glob.glob(glob.escape(prefix) + "*") + glob.glob(glob.escape(old_prefix) + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    path = f"{prefix}{os.getpid()}"
    os.mkdir(path)
    return path


def fsync_tree(path: str, files: bool = True) -> None:
    """fsync every file (unless the writer already did) and every folder under `path`, files first."""
    for root, _, names in os.walk(path, topdown=False):
        for name in names if files else ():
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT / SIGTERM until the block is done, then deliver them (Python handlers run only in the main
    thread, so swapping the handlers there is enough, whichever thread the kernel picks)."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, sigs):
        yield  # not ours to swap (another thread, or handlers set outside Python)
        return
    caught = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def _exchange(a: str, b: str) -> bool:
    """Swap two folders in one step (renameat2 RENAME_EXCHANGE); False where the OS or file system can't."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def publish_dir(stage: str, out: str, synced: bool = False) -> None:
    """Make the finished `stage` folder OUT, replacing an empty or previous output. `synced`: every file
    in it was fsynced by its writer already.

    OUT is never seen half-written: a new OUT appears in one rename, a previous one is swapped for the new
    one in one step where the OS allows it. SIGINT / SIGTERM wait until the swap is done (they then still
    stop the program, with OUT complete).
    """
    fsync_tree(stage, files=not synced)  # folders always: their entries must be durable before the rename
    real = os.path.realpath(out)
    old = None
    with _signals_deferred():
        if os.path.isdir(real):
            if _exchange(stage, real):
                old = stage  # the previous output, now under the staging name
            else:
                old = f"{os.path.dirname(real)}/.{os.path.basename(real)}.old-{os.getpid()}"
                os.rename(real, old)
                os.rename(stage, real)
        else:
            os.rename(stage, real)
        fd = os.open(os.path.dirname(real) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def discard(stage: str) -> None:
    shutil.rmtree(stage, ignore_errors=True)


# ---- the transaction -----------------------------------------------------------------------------------------

def check_free_space(folder: str, need: int) -> None:
    free = shutil.disk_usage(folder).free
    margin = 64 << 20
    if free < need + margin:
        raise fail(f"not enough free space in {folder}: the output needs {need / 2**30:.2f} GiB, "
                   f"{free / 2**30:.2f} GiB is free")


class HashFiles(threading.Thread):
    """sha256 of input files on a background thread, overlapping the command's own reads of them."""

    def __init__(self, paths, known=None):
        super().__init__(name="hash inputs", daemon=True)
        self.paths = list(paths)
        self.known = dict(known or {})
        self.result: dict = {}
        self.error = None
        self.stop = False

    def run(self):
        try:
            for path in self.paths:
                if path in self.known:
                    self.result[path] = self.known[path]
                    continue
                self.result[path] = sha256_file(path, stopped=lambda: self.stop)
        except OSError as exc:
            self.error = exc


def _corrupted(path: str):
    return fail(f"{path} does not match the sha256 its manifest records: corrupted? "
                "(llava-ckpt check names the damage)")


class Staged:
    """The output being built (see staged_output): `stage` is the folder to write into, `files` the manifest's
    `files` entries in the order they were added."""

    def __init__(self, stage: str):
        self.stage = stage
        self.files: list = []

    def add(self, rel: str, sha256: str | None = None) -> None:
        """Record a file written into the stage (its sha256 computed here unless the writer knew it)."""
        path = os.path.join(self.stage, rel)
        self.files.append({"path": rel, "size": os.path.getsize(path), "sha256": sha256 or sha256_file(path)})

    def copy_side_files(self, side_files, expected=None) -> None:
        """Copy config / tokenizer / processor files [(name, path)] in (fsynced). `expected`: name -> sha256 the
        copy must have (what the input's manifest records)."""
        for name, path in side_files:
            with open(path, "rb") as f:
                data = f.read()
            sha = write_atomic(os.path.join(self.stage, name), data)
            if expected and name in expected and expected[name] != sha:
                raise _corrupted(path)
            self.files.append({"path": name, "size": len(data), "sha256": sha})


@contextlib.contextmanager
def staged_output(out: str, src: str | None, need_bytes: int, manifest: dict, inputs=(), known_hashes=None,
                  expected_hashes=None, inputs_key: str = "files", overwrite: bool = False):
    """Build OUT in a staging folder and publish it, with `manifest`, when the block ends without an error.

    `inputs` [(name, real path)] are hashed on a background thread while the block runs, except those in
    `known_hashes` (path -> sha256 already verified, e.g. by `download`); an input whose hash differs from
    `expected_hashes[path]` (its own manifest's record) fails the run. At the end the inputs are recorded as
    manifest["source"][inputs_key] ({name, size, sha256} each), the files as manifest["files"], the manifest is
    written and the staging folder swapped in. Any error discards the staging folder; an OSError becomes one
    line naming the file as it would have been in OUT. An OUT that already holds another output than this
    manifest's (io.manifest.identity) is replaced only with `overwrite` (check_out)."""
    stage = staging_dir(out, src, identity(manifest), overwrite)
    try:
        check_free_space(stage, need_bytes)
        hasher = HashFiles([p for _, p in inputs], known_hashes)
        hasher.start()
        staged = Staged(stage)
        try:
            yield staged
        except BaseException:
            hasher.stop = True
            raise
        hasher.join()
        if hasher.error:
            raise hasher.error
        for path, sha in (expected_hashes or {}).items():
            if hasher.result.get(path) != sha:
                raise _corrupted(path)
        manifest = dict(manifest)
        manifest["source"] = dict(manifest.get("source", {}))
        manifest["source"][inputs_key] = [{"name": n, "size": os.path.getsize(p), "sha256": hasher.result[p]}
                                          for n, p in inputs]
        manifest["files"] = staged.files
        write_manifest(stage, manifest)
        publish_dir(stage, out, synced=True)  # every writer fsynced its file
    except OSError as exc:
        discard(stage)
        name = exc.filename
        if isinstance(name, str) and name.startswith(stage + os.sep):  # name the file as it would be in OUT
            name = os.path.join(out, os.path.relpath(name, stage))
        raise fail(f"{exc.strerror or exc} while writing {name or out}") from None
    except BaseException:
        discard(stage)
        raise

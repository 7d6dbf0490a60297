"""Outputs appear complete or not at all: built in a hidden sibling folder, fsynced, then renamed.

A run killed at any point leaves at most `.NAME.partial-PID` (or `.NAME.old-PID`) beside OUT, which the
next run for the same OUT removes; OUT itself is either absent, the previous complete output, or the new complete output.
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

MARKER = "manifest.json"


def _is_replaceable(out: str) -> bool:
    """An existing OUT may be replaced only if it is empty or a previous llava-ckpt output."""
    entries = os.listdir(out)
    if not entries:
        return True
    try:
        with open(os.path.join(out, MARKER), "rb") as f:
            return json.loads(f.read()).get("tool") == "llava-ckpt"
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: str, src: str | None = None) -> None:
    """Refuse an OUT that is a file, is not ours to replace, is inside SRC, or cannot be written."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise fail(f"output {out} exists and is not a folder")
    if os.path.isdir(out) and not _is_replaceable(out):
        raise fail(f"output folder {out} is not empty and holds no llava-ckpt manifest; "
                   "choose an empty or new folder")
    real_out = os.path.realpath(out)
    if src is not None and os.path.isdir(src):
        real_src = os.path.realpath(src)
        if os.path.commonpath([real_src, real_out]) == real_src:
            raise fail(f"output {out} is inside the source checkpoint {src}")
    parent = os.path.dirname(real_out) or "."
    if not os.path.isdir(parent):
        what = "is not a folder" if os.path.exists(parent) else "does not exist"
        raise fail(f"the folder that should hold {out} {what}: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise fail(f"cannot write in {parent} (permission denied)")


def _partial_prefix(out: str) -> str:
    real = os.path.realpath(out)
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.partial-")


def staging_dir(out: str, src: str | None = None) -> str:
    """A fresh hidden folder beside OUT to build the output in (stale ones from killed runs are removed)."""
    check_out(out, src)
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

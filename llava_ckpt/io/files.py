"""Small file helpers, one home each: a file's sha256, a folder's fsync, an atomic small-file write and a
bounded JSON read. Everything that hashes, syncs or writes a small file imports them from here."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import secrets

from ..errors import fail

HASH_WINDOW = 64 << 20


def sha256_file(path: str, on_block=None, stopped=lambda: False, window: int = HASH_WINDOW) -> str:
    """sha256 of a file, read through read-only mmap windows: no copy out of the page cache (a read() costs
    one), and each window is unmapped before the next so resident memory stays at one window.

    `on_block(offset, view)` sees every window too (a second digest, per-range hashes) in the same pass;
    `stopped()` ends the pass early (the result is then meaningless)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        for offset in range(0, size, window):
            if stopped():
                break
            with mmap.mmap(f.fileno(), min(window, size - offset), offset=offset, access=mmap.ACCESS_READ) as m:
                m.madvise(mmap.MADV_SEQUENTIAL)
                with memoryview(m) as view:
                    h.update(view)
                    if on_block is not None:
                        on_block(offset, view)
    return h.hexdigest()


def fsync_dir(path: str) -> None:
    """Make a folder's entries (a rename, a new file) durable. Quietly skipped where a folder cannot be
    opened or synced (some file systems refuse)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_temp(folder: str, name: str) -> tuple:
    """(fd, path) of a new hidden `.NAME.<random>.tmp` file in `folder`, opened for writing, with the mode every
    file we write gets: 0666 less the umask, like any other tool's output (mkstemp's 0600 would leave the
    config unreadable to a user or container that can read the weights)."""
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file in {folder}")


def write_atomic(path: str, data) -> str:
    """Write a small file completely or not at all: temp file in the same folder, fsync, rename, fsync the
    folder. `data` is bytes or text (UTF-8). Returns the sha256 of the bytes written."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = create_temp(folder, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)
    return hashlib.sha256(data).hexdigest()


def write_json(path: str, obj) -> str:
    """write_atomic of `obj` as indented JSON with a final newline; returns its sha256."""
    return write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def read_json(path: str, what: str | None = None, limit: int = 64 << 20):
    """Parse a JSON file that is input to us: a regular file of at most `limit` bytes, UTF-8, valid JSON.
    Anything else is one clear error naming `what` (default: the path); never a traceback, never a read
    of a FIFO or /dev/zero that does not end."""
    what = what or path
    if not os.path.lexists(path):
        raise fail(f"{what} does not exist")
    if not os.path.isfile(path):
        raise fail(f"{what} is not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise fail(f"cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise fail(f"{what} is larger than {limit >> 20} MiB: not what it should be")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"{what} is not valid JSON ({exc})") from None

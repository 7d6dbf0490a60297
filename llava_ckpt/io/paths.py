"""Path containment, in one place: does a path stay inside a folder?

Both sides are resolved (symlinks followed, `..` and `.` folded, made absolute) before they are compared, so
a relative path, a path through a symlinked folder, a trailing slash and `.` all give the same answer as the
absolute real path would. Every reader that follows a name from a file (an index's shard names, a manifest's
file list, rank folders, side files) asks here, and nothing else compares paths.
"""
from __future__ import annotations

import os

from ..errors import fail


def is_plain_name(name) -> bool:
    """A relative path written in a file we read (index, manifest): '/'-separated parts, none empty, `.` or `..`,
    not absolute, no backslash or NUL. Such a name cannot climb out of its folder by spelling alone."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\0" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def within(path: str, root: str) -> bool:
    """True when `path`, resolved, is `root` (resolved) or below it."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([top, real]) == top


def inside(folder: str, name: str, what: str, extra_roots=()) -> str:
    """The real path of `name` in `folder`; one clear error when `name` is not a plain name or resolves outside
    `folder` (or outside every one of `extra_roots`, folders it may also lead into, such as a hub cache's blob
    store). `what` names the file that gave `name`, for the message."""
    if not is_plain_name(name):
        raise fail(f"{what}: file name {name!r} is not a plain name inside the checkpoint folder")
    real = os.path.realpath(os.path.join(folder, name))
    if not any(within(real, root) for root in (folder, *extra_roots)):
        raise fail(f"{what}: {name!r} resolves outside the checkpoint folder {folder} ({real})")
    return real

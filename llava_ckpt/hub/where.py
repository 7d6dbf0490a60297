"""Where a download lives (the hub cache, shared with huggingface_hub's own tools, or a --local-dir) and
whether the network may be used. Both are read from the environment at call time: huggingface_hub froze
its constants at import, and callers (tests, long-lived processes) change the environment after that."""
from __future__ import annotations

import os
import re

_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_commit(revision: str) -> bool:
    """True for a full commit sha: a revision that needs no lookup and never moves."""
    return bool(_COMMIT.fullmatch(revision))


class Where:
    """Where files, refs and verification records live: the hub cache, or a --local-dir."""

    def __init__(self, repo: str, local_dir: str | None):
        self.repo = repo
        self.cache_dir = cache_dir()
        self.storage = os.path.join(self.cache_dir, "models--" + repo.replace("/", "--"))  # the repo in the cache
        self.local_dir = os.path.abspath(local_dir) if local_dir else None
        if self.local_dir:
            self.records = os.path.join(self.local_dir, ".cache", "llava-ckpt")
            self.refs = os.path.join(self.records, "refs")
        else:
            self.records = os.path.join(self.storage, "llava-ckpt")
            self.refs = os.path.join(self.storage, "refs")  # the hub's own refs: hub tools see them too

    def root(self, commit: str) -> str:
        if self.local_dir:
            return self.local_dir
        return os.path.join(self.storage, "snapshots", commit)


def offline() -> bool:
    from huggingface_hub import constants
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE


def cache_dir() -> str:
    """The hub cache as the environment says now (huggingface_hub froze it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE

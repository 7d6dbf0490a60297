"""Moving the bytes. Small files go through hf_hub_download (redirects, auth, the cache layout). LFS files
(the weights) are streamed here instead, into a partial file with a stable name (`blobs/<sha256>.incomplete`
in the hub cache, `<local_dir>/.cache/llava-ckpt/incomplete/<sha256>.incomplete` for a --local-dir) that
survives a failed or killed run: the next run hashes the bytes already there and asks only for the rest
(`Range: bytes=N-`), hashing as bytes arrive, then moves the verified file to where hf_hub_download would
have put it."""
from __future__ import annotations

import hashlib
import os
import re
import time
from contextlib import suppress
from pathlib import Path

from ..errors import fail
from ..io.files import fsync_dir
from .records import stat_key
from .where import Where

HASH_CHUNK = 16 << 20
STREAM_RETRIES = 5  # in-run resumptions in a row without a byte received, as huggingface_hub does
STREAM_RETRY_DELAY = 1.0


class Fetcher:
    """Fetch one file at a pinned commit (no network when it is already in place).

    Returns (path, entry): entry is the verified record entry when the file was streamed and hashed here, None
    when the caller still has to verify the file (small files via hf_hub_download, files already on disk).
    """

    def __init__(self, where: Where, commit: str, endpoint: str, token: str | None, progress: bool):
        self.where, self.commit, self.endpoint, self.token, self.progress = where, commit, endpoint, token, progress

    def __call__(self, name: str, want: dict) -> tuple[str, dict | None]:
        if want.get("lfs_sha256") and want.get("size") is not None:
            return self._resumable(name, want)
        from huggingface_hub import hf_hub_download
        return hf_hub_download(self.where.repo, name, revision=self.commit, cache_dir=self.where.cache_dir,
                               local_dir=self.where.local_dir, endpoint=self.endpoint, token=self.token,
                               tqdm_class=bar_class(name, self.progress)), None

    # -- LFS files: resumable across runs --------------------------------------------------------------

    def _resumable(self, name: str, want: dict) -> tuple[str, dict | None]:
        from huggingface_hub.utils import WeakFileLock
        sha = want["lfs_sha256"]
        if self.where.local_dir:
            found = self._local_dir_existing(name, sha)
            if found:
                return found, None
            from huggingface_hub._local_folder import get_local_download_paths
            paths = get_local_download_paths(Path(self.where.local_dir), name)
            final, lock = str(paths.file_path), str(paths.lock_path)
            partial = os.path.join(self.where.records, "incomplete", f"{sha}.incomplete")
        else:
            storage = self.where.storage
            final = os.path.join(storage, "snapshots", self.commit, *name.split("/"))
            blob = os.path.join(storage, "blobs", sha)
            lock = os.path.join(self.where.cache_dir, ".locks", os.path.basename(storage), f"{sha}.lock")
            partial = blob + ".incomplete"
            if os.path.exists(final):
                return final, None
            if os.path.exists(blob):  # same content under another commit: link it, the caller verifies it
                self._link(blob, final, new_blob=False, lock=lock)
                return final, None
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        waited_from = time.time_ns()
        with WeakFileLock(lock):
            if self._placed_meanwhile(final, partial, waited_from):  # another process finished it first
                return final, None  # the caller verifies it
            got = self._stream(name, want["size"], partial)
            if got != sha:
                with suppress(FileNotFoundError):
                    os.remove(partial)
                raise fail(f"{name}: sha256 {got} does not match the hub's {sha} ({self.where.repo}@{self.commit}); "
                           "the file was deleted, run again to re-download")
            self._place(partial, final)
        if self.where.local_dir:  # takes the same lock itself
            from huggingface_hub._local_folder import write_download_metadata
            write_download_metadata(Path(self.where.local_dir), name, commit_hash=self.commit, etag=sha)
        return final, {**want, "sha256": got, "stat": stat_key(final)}

    def _placed_meanwhile(self, final: str, partial: str, since_ns: int) -> bool:
        if self.where.local_dir:
            return os.path.isfile(final) and os.stat(final).st_mtime_ns >= since_ns
        blob = partial[:-len(".incomplete")]
        if not os.path.exists(blob):
            return False
        if not os.path.lexists(final):
            self._link(blob, final, new_blob=False)
        return True

    def _local_dir_existing(self, name: str, sha: str) -> str | None:
        """A --local-dir file that is already there (as hf_hub_download would reuse it), or a cached copy of it."""
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub._local_folder import read_download_metadata, write_download_metadata
        local_dir = Path(self.where.local_dir)
        path = os.path.join(self.where.local_dir, *name.split("/"))
        meta = read_download_metadata(local_dir, name)
        if os.path.isfile(path) and meta is not None and (meta.commit_hash == self.commit or meta.etag == sha):
            if meta.commit_hash != self.commit:
                write_download_metadata(local_dir, name, commit_hash=self.commit, etag=sha)
            return path
        cached = try_to_load_from_cache(self.where.repo, name, cache_dir=self.where.cache_dir, revision=self.commit)
        if isinstance(cached, str):
            import shutil
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            shutil.copyfile(cached, tmp)
            os.replace(tmp, path)
            write_download_metadata(local_dir, name, commit_hash=self.commit, etag=sha)
            return path
        return None

    def _stream(self, name: str, size: int, partial: str) -> str:
        """Bring `partial` to `size` bytes, resuming from what it holds; return the sha256 of the whole file."""
        import httpx2
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
        url = hf_hub_url(self.where.repo, name, revision=self.commit, endpoint=self.endpoint)
        os.makedirs(os.path.dirname(partial), exist_ok=True)
        with open(partial, "ab"):
            pass
        with open(partial, "r+b") as f:
            have = os.fstat(f.fileno()).st_size
            if have > size:  # not a prefix of this file
                f.truncate(0)
                have = 0
            sha256 = _hash_prefix(f, have)
            bar_type = bar_class(name, self.progress)
            with bar_type(total=size, initial=have, unit="B", unit_scale=True, unit_divisor=1024) as bar:
                failures, restarted = 0, False
                while have < size:
                    headers = build_hf_headers(token=self.token)
                    headers["Accept-Encoding"] = "identity"  # a compressed reply would not honour Range
                    if have:
                        headers["Range"] = f"bytes={have}-"
                    got_bytes = False
                    try:
                        with get_session().stream("GET", url, headers=headers,
                                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as reply:
                            if have and reply.status_code == 416 and not restarted:
                                restarted = True  # the server disowns our prefix: start over
                                have, sha256 = _restart(f, bar)
                                continue
                            hf_raise_for_status(reply)
                            if have and not _continues_at(reply, have):
                                if reply.status_code != 200:  # a 206 from elsewhere: ask again for everything
                                    have, sha256 = _restart(f, bar)
                                    continue
                                have, sha256 = _restart(f, bar)  # a 200 is the whole file: take it from byte 0
                            for chunk in reply.iter_bytes():
                                if not chunk:
                                    continue
                                if have + len(chunk) > size:
                                    f.close()
                                    with suppress(FileNotFoundError):
                                        os.remove(partial)
                                    raise fail(f"{name}: the hub sent more than the {size} bytes it lists "
                                               f"({self.where.repo}@{self.commit}); the partial file was deleted, "
                                               "run again to re-download")
                                f.write(chunk)
                                sha256.update(chunk)
                                have += len(chunk)
                                bar.update(len(chunk))
                                got_bytes = True
                        if have < size and not got_bytes:
                            raise httpx2.RemoteProtocolError(f"{name}: the reply ended at byte {have} of {size}")
                    except (httpx2.NetworkError, httpx2.TimeoutException, httpx2.RemoteProtocolError):
                        failures = 0 if got_bytes else failures + 1
                        if failures > STREAM_RETRIES:
                            raise
                        time.sleep(STREAM_RETRY_DELAY)
                        continue
                    failures = 0
            f.flush()
            os.fsync(f.fileno())
        return sha256.hexdigest()

    def _place(self, partial: str, final: str) -> None:
        """Move a verified partial file to where hf_hub_download would have put it."""
        if self.where.local_dir:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(partial, final)
        else:
            blob = partial[:-len(".incomplete")]
            os.replace(partial, blob)
            self._link(blob, final, new_blob=True)
        fsync_dir(os.path.dirname(partial))

    def _link(self, blob: str, pointer: str, new_blob: bool, lock: str | None = None) -> None:
        from huggingface_hub.file_download import _create_symlink
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        if lock is None:
            _create_symlink(blob, pointer, new_blob=new_blob)
            return
        from huggingface_hub.utils import WeakFileLock
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        with WeakFileLock(lock):
            if not os.path.exists(pointer):
                _create_symlink(blob, pointer, new_blob=new_blob)


def _hash_prefix(f, n: int):
    """A running sha256 of the first n bytes of an open partial file, to be continued with the bytes still to
    come (io.files.sha256_file returns a finished digest, which cannot be continued)."""
    sha256 = hashlib.sha256()
    f.seek(0)
    left = n
    while left:
        block = f.read(min(HASH_CHUNK, left))
        if not block:
            break
        sha256.update(block)
        left -= len(block)
    f.seek(n)
    return sha256


def _restart(f, bar):
    f.seek(0)
    f.truncate(0)
    bar.initial = 0  # so the rate shown does not count the discarded prefix
    bar.reset(total=bar.total)
    return 0, hashlib.sha256()


def _continues_at(reply, offset: int) -> bool:
    """True when a reply to `Range: bytes=<offset>-` carries exactly the bytes from `offset` on."""
    if reply.status_code != 206:
        return False
    m = re.match(r"\s*bytes\s+(\d+)-", reply.headers.get("Content-Range", ""))
    return bool(m) and int(m.group(1)) == offset


def bar_class(name: str, show: bool):
    """huggingface_hub's tqdm (stderr, TTY-aware, HF_HUB_DISABLE_PROGRESS_BARS), labelled with the file name."""
    from huggingface_hub.utils import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["desc"] = name
            if not show:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)
    return Bar

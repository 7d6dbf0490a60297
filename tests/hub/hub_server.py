"""A loopback stand-in for the Hugging Face Hub, enough for huggingface_hub 2.4's downloads.

It serves local folders as model repos at one fixed fake commit, speaking the subset of the protocol
snapshot_download / hf_hub_download use (huggingface_hub 2.4, observed against the real hub): the revision API, the tree API with lfs
sha256, HEAD/GET on resolve with Range. Tests turn knobs on it (corrupt bytes, drop a connection, require a
token) and read its request log. Bound to 127.0.0.1 only; use it through the `hub` pytest fixture.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".model")


def git_blob_sha1(data: bytes) -> str:
    """The oid the hub reports for a non-LFS file: git's blob hash."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LoopbackHub:
    """Serve {repo_id: folder}. Knobs are plain attributes; `requests` logs (method, path, range header)."""

    def __init__(self):
        self.repos: dict[str, str] = {}
        self.commit = COMMIT
        self.token: str | None = None           # require `Authorization: Bearer <token>` when set
        self.corrupt: set[str] = set()          # repo paths served with one byte flipped (size unchanged)
        self.drop: dict[str, int] = {}          # repo path -> byte offset at which the next GET is cut (once)
        self.fail_after_drop = 0                # after a drop, answer the next N GETs of that file with 503
        self.slow: dict[str, float] = {}        # repo path -> seconds of pause after each 16 KiB block of a GET
        self.ignore_range: set[str] = set()     # repo paths answered 200 with the whole file even to a Range GET
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._failing: dict[str, int] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> "LoopbackHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def add_repo(self, repo_id: str, folder: str) -> None:
        self.repos[repo_id] = str(folder)

    def file_gets(self, name: str | None = None) -> list[tuple[str, str, str | None]]:
        """GET requests for file contents (resolve URLs), optionally only those of one file name."""
        return [r for r in self.requests if r[0] == "GET" and "/resolve/" in r[1]
                and (name is None or r[1].endswith("/" + name))]

    # --- request handling -------------------------------------------------------------------------------

    def _files(self, repo_id: str) -> dict[str, str]:
        root = self.repos[repo_id]
        out = {}
        for dirpath, _, names in os.walk(root):
            for n in names:
                full = os.path.join(dirpath, n)
                out[os.path.relpath(full, root).replace(os.sep, "/")] = full
        return out

    def _entry(self, rel: str, full: str) -> dict:
        data = open(full, "rb").read()
        entry = {"type": "file", "path": rel, "size": len(data), "oid": git_blob_sha1(data)}
        if rel.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _split(self, path: str):
        """Return (kind, repo_id, revision, file) for an API or resolve path, or None."""
        parts = [unquote(p) for p in path.split("/") if p]
        if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] in ("revision", "tree"):
            return parts[4], "/".join(parts[2:4]), parts[5] if len(parts) > 5 else "main", None
        if len(parts) >= 5 and parts[2] == "resolve":
            return "resolve", "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        return None

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _error(self, status, code=None, message=None):
                body = json.dumps({"error": message or code or "error"}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                if message:
                    self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _serve(self, head):
                path = urlsplit(self.path).path
                with hub._lock:
                    hub.requests.append((self.command, path, self.headers.get("Range")))
                route = hub._split(path)
                if route is None:
                    return self._error(404, message="no such route")
                kind, repo_id, rev, rel = route
                if repo_id not in hub.repos:
                    return self._error(404 if hub.token is None else 401, "RepoNotFound", "Repository not found")
                if hub.token is not None:
                    auth = self.headers.get("Authorization")
                    if auth is None:
                        return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
                    if auth != f"Bearer {hub.token}":
                        return self._error(401, message="Invalid credentials in Authorization header")
                if rev not in ("main", hub.commit):
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                files = hub._files(repo_id)
                if kind == "revision":
                    return self._json({"id": repo_id, "sha": hub.commit, "private": False,
                                       "siblings": [{"rfilename": f} for f in sorted(files)]})
                if kind == "tree":
                    return self._json([hub._entry(f, files[f]) for f in sorted(files)])
                if rel not in files:
                    return self._error(404, "EntryNotFound", f"{rel} does not exist")
                self._send_file(rel, files[rel], head)

            def _send_file(self, rel, full, head):
                data = open(full, "rb").read()
                entry = hub._entry(rel, full)
                etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
                if rel in hub.corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                with hub._lock:
                    failing = hub._failing.get(rel, 0)
                    if not head and failing:
                        hub._failing[rel] = failing - 1
                if not head and failing:
                    return self._error(503, message="temporarily unavailable")
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and not head and rel not in hub.ignore_range:
                    start = int(rng[6:].split("-")[0])
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                with hub._lock:
                    cut = hub.drop.pop(rel, None)
                    if cut is not None:
                        hub._failing[rel] = hub.fail_after_drop
                if cut is not None and cut > start:
                    self.wfile.write(body[:cut - start])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the client sees the body end early
                    return
                pause = hub.slow.get(rel)
                if pause:
                    try:
                        for i in range(0, len(body), 16 << 10):
                            self.wfile.write(body[i:i + (16 << 10)])
                            self.wfile.flush()
                            time.sleep(pause)
                    except (BrokenPipeError, ConnectionResetError):  # the client went away (killed)
                        self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler

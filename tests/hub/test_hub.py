"""`download` against a loopback hub: pinned, hash-checked, resumable, cache-reusing, clean errors."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import COMMIT, LoopbackHub  # noqa: E402

from llava_ckpt import hub as hubmod  # noqa: E402
from llava_ckpt.cli import main  # noqa: E402
from llava_ckpt.convert import convert  # noqa: E402
from llava_ckpt.errors import CheckpointError  # noqa: E402
from llava_ckpt.fixture import make_fixture  # noqa: E402
from llava_ckpt.hub import records, remote, transfer  # noqa: E402

REPO = "llava-hf/llava-1.5-7b-hf"
VENV_BIN = os.path.dirname(sys.executable)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny LLaVA checkpoint as the served repo, plus files a download must skip (pickles, unrelated files)."""
    root = make_fixture(str(tmp_path_factory.mktemp("served") / "repo"), preset="tiny")
    for extra in ("pytorch_model.bin", "README.md", "onnx/model.safetensors"):
        os.makedirs(os.path.dirname(os.path.join(root, extra)), exist_ok=True)
        with open(os.path.join(root, extra), "wb") as f:
            f.write(b"not needed " * 100)
    return root


@pytest.fixture
def hub(served, tmp_path, monkeypatch):
    server = LoopbackHub()
    server.add_repo(REPO, served)
    server.start()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(remote, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setattr(transfer, "STREAM_RETRY_DELAY", 0.0)
    yield server
    server.stop()


def needed(served):
    """What a download should bring: everything but pickles, README and sub-folders."""
    return sorted(n for n in os.listdir(served) if os.path.isfile(os.path.join(served, n))
                  and not n.endswith(".bin") and n != "README.md")


def largest_shard(served):
    return max((n for n in needed(served) if n.endswith(".safetensors")),
               key=lambda n: os.path.getsize(os.path.join(served, n)))


def test_download_is_byte_identical_and_pinned(hub, served):
    result = hubmod.download(REPO, progress=False)
    assert result["commit_sha"] == COMMIT and result["repo_id"] == REPO and result["revision"] == "main"
    got = sorted(os.listdir(result["path"]))
    assert got == needed(served)
    for entry in result["files"]:
        served_file = os.path.join(served, entry["path"])
        assert entry["sha256"] == _sha256(served_file)
        assert entry["size"] == os.path.getsize(served_file)
        with open(os.path.join(result["path"], entry["path"]), "rb") as a, open(served_file, "rb") as b:
            assert a.read() == b.read()
    assert not hub.file_gets("pytorch_model.bin") and not hub.file_gets("README.md")
    json.dumps(result)


def test_second_run_sends_no_file_requests_and_does_not_rehash(hub, served, monkeypatch):
    first = hubmod.download(REPO, progress=False)
    hub.requests.clear()
    calls = []
    real = records.sha256_file
    monkeypatch.setattr(records, "sha256_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    second = hubmod.download(REPO, progress=False)
    assert second == first
    assert [r for r in hub.requests if "/resolve/" in r[1]] == []  # no HEAD, no GET
    assert calls == []
    # pinned to the commit: not even the revision API is asked
    hub.requests.clear()
    assert hubmod.download(REPO, revision=COMMIT, progress=False)["path"] == first["path"]
    assert hub.requests == []


def test_changed_cached_file_is_rehashed_and_refused(hub, served):
    first = hubmod.download(REPO, progress=False)
    shard = largest_shard(served)
    blob = os.path.realpath(os.path.join(first["path"], shard))
    data = bytearray(open(blob, "rb").read())
    data[-1] ^= 1
    with open(blob, "wb") as f:
        f.write(data)
    with pytest.raises(CheckpointError, match=shard):
        hubmod.download(REPO, progress=False)
    assert not os.path.exists(blob) and not os.path.lexists(os.path.join(first["path"], shard))
    hub.requests.clear()
    again = hubmod.download(REPO, progress=False)  # heals: only the deleted file moves again
    assert again == first
    assert {r[1].rsplit("/", 1)[1] for r in hub.file_gets()} == {shard}


@pytest.mark.parametrize("use_local_dir", [False, True])
def test_corrupted_bytes_are_refused_and_removed(hub, served, tmp_path, use_local_dir):
    shard = largest_shard(served)
    hub.corrupt.add(shard)
    local_dir = str(tmp_path / "local") if use_local_dir else None
    with pytest.raises(CheckpointError, match=f"{shard}: sha256 .* does not match") as info:
        hubmod.download(REPO, local_dir=local_dir, progress=False)
    assert "\n" not in str(info.value)
    if use_local_dir:
        assert not os.path.exists(os.path.join(local_dir, shard))
    else:
        repo_dir = os.path.join(os.environ["HF_HOME"], "hub", "models--llava-hf--llava-1.5-7b-hf")
        assert not os.path.lexists(os.path.join(repo_dir, "snapshots", COMMIT, shard))
        assert _sha256(os.path.join(served, shard)) not in os.listdir(os.path.join(repo_dir, "blobs"))
    hub.corrupt.clear()
    result = hubmod.download(REPO, local_dir=local_dir, progress=False)
    assert _sha256(os.path.join(result["path"], shard)) == _sha256(os.path.join(served, shard))


def test_dropped_connection_is_resumed_with_range(hub, served, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # tiny files: resume at 1 KiB granularity
    shard = largest_shard(served)
    size = os.path.getsize(os.path.join(served, shard))
    hub.drop[shard] = size // 2
    result = hubmod.download(REPO, progress=False)
    ranges = [r[2] for r in hub.file_gets(shard)]
    assert len(ranges) == 2 and ranges[0] is None
    start = int(ranges[1].split("=")[1].split("-")[0])
    assert 0 < start <= size // 2
    assert _sha256(os.path.join(result["path"], shard)) == _sha256(os.path.join(served, shard))


def test_failed_run_keeps_finished_files_for_the_next_run(hub, served):
    shard = sorted(n for n in needed(served) if n.endswith(".safetensors"))[-1]  # fetched last
    hub.drop[shard] = 100
    hub.fail_after_drop = 1  # the in-run retry gets a 503: the run fails
    with pytest.raises(CheckpointError, match="HTTP 503"):
        hubmod.download(REPO, progress=False)
    hub.requests.clear()
    result = hubmod.download(REPO, progress=False)
    assert {r[1].rsplit("/", 1)[1] for r in hub.file_gets()} == {shard}
    assert sorted(os.listdir(result["path"])) == needed(served)


def test_offline_reuses_the_verified_cache_without_network(hub, served, monkeypatch):
    first = hubmod.download(REPO, progress=False)
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hubmod.download(REPO, progress=False) == first
    assert hub.requests == []
    blob = os.path.realpath(os.path.join(first["path"], "config.json"))
    with open(blob, "r+b") as f:  # same size, other bytes: offline still catches it (git sha1)
        data = f.read()
        f.seek(0)
        f.write(data.replace(b"llava", b"LLAVA", 1))
    with pytest.raises(CheckpointError, match="config.json: git sha1"):
        hubmod.download(REPO, progress=False)
    assert not os.path.exists(blob)


def test_unreadable_record_counts_as_no_record(hub, served, monkeypatch):
    first = hubmod.download(REPO, progress=False)
    record = os.path.join(os.environ["HF_HOME"], "hub", "models--llava-hf--llava-1.5-7b-hf", "llava-ckpt",
                          f"{COMMIT}.json")
    for bad in (b"{not json", b"[]"):
        with open(record, "wb") as f:
            f.write(bad)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(CheckpointError, match="no verified download"):
            hubmod.download(REPO, progress=False)
        monkeypatch.delenv("HF_HUB_OFFLINE")
        assert hubmod.download(REPO, progress=False) == first  # online: listed, re-hashed, record written again
        assert json.load(open(record))["commit_sha"] == COMMIT


def test_offline_without_a_download_is_a_clean_error(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set.*no verified download"):
        hubmod.download(REPO, progress=False)
    assert hub.requests == []


def _dead_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_hub(hub, served, monkeypatch):
    dead = _dead_endpoint()
    with pytest.raises(CheckpointError, match="cannot reach"):
        hubmod.download(REPO, progress=False, endpoint=dead)
    first = hubmod.download(REPO, progress=False)  # once verified, a dead hub falls back to the copy
    assert hubmod.download(REPO, progress=False, endpoint=dead) == first


def test_unknown_repo_and_revision(hub):
    with pytest.raises(CheckpointError, match="repository llava-hf/nope not found"):
        hubmod.download("llava-hf/nope", progress=False)
    with pytest.raises(CheckpointError, match="revision 'v9' not found"):
        hubmod.download(REPO, revision="v9", progress=False)
    with pytest.raises(CheckpointError, match="not a hub repo id"):
        hubmod.download("not a repo", progress=False)


def test_token_required(hub, served, monkeypatch):
    hub.token = "s3cret"
    with pytest.raises(CheckpointError, match="gated.*HF_TOKEN"):
        hubmod.download(REPO, progress=False)
    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(CheckpointError, match="denied \\(HTTP 401\\)"):
        hubmod.download(REPO, progress=False)
    monkeypatch.setenv("HF_TOKEN", "s3cret")
    assert hubmod.download(REPO, progress=False)["commit_sha"] == COMMIT


def test_pickle_only_and_non_llava_repos_are_refused(hub, served, tmp_path):
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    shutil.copy(os.path.join(served, "config.json"), pickles)
    (pickles / "pytorch_model.bin").write_bytes(b"\x80\x04" * 100)
    hub.add_repo("org/pickles", str(pickles))
    with pytest.raises(CheckpointError, match="no .safetensors weights \\(only pickle weights: pytorch_model.bin"):
        hubmod.download("org/pickles", progress=False)
    assert hub.file_gets() == []

    llama = tmp_path / "llama"
    shutil.copytree(served, llama)
    cfg = json.load(open(llama / "config.json"))
    cfg["model_type"] = "llama"
    (llama / "config.json").write_text(json.dumps(cfg))
    hub.add_repo("org/llama", str(llama))
    with pytest.raises(CheckpointError, match="not a LLaVA config"):
        hubmod.download("org/llama", progress=False)
    assert [r[1] for r in hub.file_gets()] == [f"/org/llama/resolve/{COMMIT}/config.json"]  # no weights moved


def test_is_repo_id(tmp_path, monkeypatch):
    assert hubmod.is_repo_id(REPO)
    for s in ("llava", "a/b/c", "/abs/path", "./x", "a/..", "org/na--me", ""):
        assert not hubmod.is_repo_id(s), s
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not hubmod.is_repo_id("org/name")
    assert hubmod.is_repo_id("org/other")


def test_cli_download_json_and_errors(hub, served, tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["download", REPO, "--local-dir", str(tmp_path / "ld"), "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["path"] == str(tmp_path / "ld") and result["commit_sha"] == COMMIT
    assert sorted(f["path"] for f in result["files"]) == needed(served)
    bad = runner.invoke(main, ["download", REPO, "--revision", "nope"])
    assert bad.exit_code == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: revision 'nope' not found")


def test_cli_subprocess_errors_are_one_line(hub, served):
    exe = os.path.join(VENV_BIN, "llava-ckpt")
    assert os.path.exists(exe), "the llava-ckpt console script is not installed (pip install -e .)"
    env = dict(os.environ)
    hub.corrupt.add(largest_shard(served))
    proc = subprocess.run([exe, "download", REPO, "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {largest_shard(served)}: sha256 ") and proc.stderr.count("\n") == 1
    assert proc.stdout == ""
    hub.corrupt.clear()
    proc = subprocess.run([exe, "download", REPO], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"commit_sha: {COMMIT}" in proc.stdout


def test_cli_from_a_working_folder_with_relative_paths(hub, served, tmp_path):
    """As a user types it: a relative --local-dir (trailing slash), then convert of the repo id and of the
    downloaded folder through a symlink, into relative OUTs; a second download into the same folder is a rerun."""
    exe = os.path.join(VENV_BIN, "llava-ckpt")

    def run(*args):
        proc = subprocess.run([exe, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stderr == "", (args, proc.stderr)
        return proc
    run("download", REPO, "--local-dir", "ld/")
    run("download", REPO, "--local-dir", "./ld")
    assert sorted(os.listdir(tmp_path / "ld")) == sorted(needed(served) + [".cache"])
    os.symlink("ld", tmp_path / "ld-link")
    run("convert", "ld-link", "out/")
    run("convert", REPO, "out-hub")
    assert (tmp_path / "out" / "llava.safetensors").read_bytes() == \
        (tmp_path / "out-hub" / "llava.safetensors").read_bytes()
    hub_manifest = json.loads((tmp_path / "out-hub" / "manifest.json").read_text())
    assert hub_manifest["source"]["repo_id"] == REPO
    proc = subprocess.run([exe, "convert", REPO, "out"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "already holds a convert output" in proc.stderr and "--overwrite" in proc.stderr


def test_convert_repo_id_end_to_end(hub, served, tmp_path):
    out = tmp_path / "out"
    result = convert(REPO, str(out), fmt="safetensors", progress=False)
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source["repo_id"] == REPO and source["commit_sha"] == COMMIT and source["revision"] == "main"
    for f in source["files"]:
        assert f["sha256"] == _sha256(os.path.join(served, f["name"])), f["name"]
    assert result is not None
    gets = len(hub.file_gets())
    convert(REPO, str(tmp_path / "out2"), fmt="safetensors", progress=False)
    assert len(hub.file_gets()) == gets  # the second conversion reuses the verified cache


# --- resume across runs (LFS files stream into a partial file with a stable name) ---------------------------

def _partial_path(served, shard, local_dir=None):
    sha = _sha256(os.path.join(served, shard))
    if local_dir:
        return os.path.join(local_dir, ".cache", "llava-ckpt", "incomplete", f"{sha}.incomplete")
    return os.path.join(os.environ["HF_HOME"], "hub", "models--llava-hf--llava-1.5-7b-hf", "blobs",
                        f"{sha}.incomplete")


def _fail_mid_file(hub, served, shard, local_dir=None):
    """One run whose connection drops mid-file and whose in-run resume gets a 503: it leaves a partial file."""
    size = os.path.getsize(os.path.join(served, shard))
    hub.drop[shard] = size // 2
    hub.fail_after_drop = 1
    with pytest.raises(CheckpointError, match="HTTP 503"):
        hubmod.download(REPO, local_dir=local_dir, progress=False)
    hub.fail_after_drop = 0
    partial = _partial_path(served, shard, local_dir)
    assert os.path.getsize(partial) == size // 2
    return partial


@pytest.mark.parametrize("use_local_dir", [False, True])
def test_failed_run_is_resumed_by_the_next_run_with_range(hub, served, tmp_path, monkeypatch, use_local_dir):
    shard = largest_shard(served)
    size = os.path.getsize(os.path.join(served, shard))
    local_dir = str(tmp_path / "local") if use_local_dir else None
    partial = _fail_mid_file(hub, served, shard, local_dir)
    hub.requests.clear()
    result = hubmod.download(REPO, local_dir=local_dir, progress=False)
    assert [r[2] for r in hub.file_gets(shard)] == [f"bytes={size // 2}-"]  # only the missing half moved
    assert not os.path.exists(partial)
    with open(os.path.join(result["path"], shard), "rb") as a, open(os.path.join(served, shard), "rb") as b:
        assert a.read() == b.read()
    entry = next(f for f in result["files"] if f["path"] == shard)
    assert entry["sha256"] == _sha256(os.path.join(served, shard)) and entry["size"] == size
    if not use_local_dir:  # laid out as hf_hub_download would: snapshot symlink into blobs/<sha256>
        link = os.path.join(result["path"], shard)
        assert os.path.islink(link) and os.path.basename(os.path.realpath(link)) == entry["sha256"]
    hub.requests.clear()  # the record covers the resumed file: offline, nothing is re-hashed or fetched
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hubmod.download(REPO, local_dir=local_dir, progress=False) == result
    assert hub.requests == []


def test_corrupted_partial_is_caught_deleted_and_refetched(hub, served):
    shard = largest_shard(served)
    partial = _fail_mid_file(hub, served, shard)
    with open(partial, "r+b") as f:  # wrong bytes in what the next run resumes from
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    hub.requests.clear()
    with pytest.raises(CheckpointError, match=f"{shard}: sha256 .* does not match") as info:
        hubmod.download(REPO, progress=False)
    assert "\n" not in str(info.value)
    assert [r[2] for r in hub.file_gets(shard)][0].startswith("bytes=")
    assert not os.path.exists(partial) and not os.path.exists(partial[:-len(".incomplete")])
    hub.requests.clear()
    result = hubmod.download(REPO, progress=False)
    assert [r[2] for r in hub.file_gets(shard)] == [None]  # from byte 0
    assert _sha256(os.path.join(result["path"], shard)) == _sha256(os.path.join(served, shard))


def test_server_ignoring_range_restarts_from_zero(hub, served):
    shard = largest_shard(served)
    _fail_mid_file(hub, served, shard)
    hub.ignore_range.add(shard)  # answers the Range GET with 200 and the whole file
    hub.requests.clear()
    result = hubmod.download(REPO, progress=False)
    assert len(hub.file_gets(shard)) == 1
    assert _sha256(os.path.join(result["path"], shard)) == _sha256(os.path.join(served, shard))


def test_killed_run_is_resumed_by_the_next_run(hub, served):
    import signal
    import time
    shard = largest_shard(served)
    size = os.path.getsize(os.path.join(served, shard))
    partial = _partial_path(served, shard)
    hub.slow[shard] = 0.01  # 16 KiB every 10 ms: a few seconds for the shard
    code = f"from llava_ckpt.hub import download; download({REPO!r}, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(partial) and os.path.getsize(partial) >= 64 << 10):
            assert proc.poll() is None, "the download ended before it could be killed"
            assert time.monotonic() < deadline, "no partial file appeared"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    have = os.path.getsize(partial)
    assert 0 < have < size
    hub.slow.clear()
    hub.requests.clear()
    result = hubmod.download(REPO, progress=False)
    assert [r[2] for r in hub.file_gets(shard)] == [f"bytes={have}-"]
    assert not os.path.exists(partial)
    entry = next(f for f in result["files"] if f["path"] == shard)
    assert entry["sha256"] == _sha256(os.path.join(served, shard))
    with open(os.path.join(result["path"], shard), "rb") as a, open(os.path.join(served, shard), "rb") as b:
        assert a.read() == b.read()

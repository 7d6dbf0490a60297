"""Bad and hostile inputs, each made on the fly from the tiny fixture and run through the real CLI.

Every case must end the same way: exit code 2, exactly one `error: ...` line on stderr that names the
problem and the file, no traceback, and nothing at OUT that looks like a finished output (no manifest, no
weights, no leftover hidden `.OUT.partial-*` staging folder).
"""
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_faults import staged_bytes

EXE = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
S1, S2, S3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
INDEX = "model.safetensors.index.json"
L1 = "language_model.model.layers.1."
# a model large enough that writing it takes a while (shared with test_faults through the session cache)
BIG = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
       "num_key_value_heads": 8}


def run(*args, timeout=60, **kw):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def looks_complete(out: Path) -> list:
    """What at or beside OUT could pass for (part of) an output: manifest, weights, staging folders."""
    found = []
    if out.is_dir():
        for root, _, files in os.walk(out):
            found += [os.path.join(root, f) for f in files
                      if f == "manifest.json" or f.endswith((".ckpt", ".safetensors"))]
    if out.parent.is_dir():
        found += [str(p) for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return found


def assert_clean_failure(proc, out: Path, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.endswith("\n"), repr(proc.stderr)
    assert proc.stderr.count("\n") == 1 and "\r" not in proc.stderr, repr(proc.stderr)
    for w in words:
        assert str(w) in proc.stderr, (w, proc.stderr)
    assert proc.stdout == ""
    assert looks_complete(out) == [], looks_complete(out)


def copy_src(tiny, dest: Path) -> Path:
    """A private copy of the checkpoint's weights, index and config (the damage never touches the fixture)."""
    dest.mkdir()
    for name in (S1, S2, S3, INDEX, "config.json"):
        shutil.copyfile(os.path.join(tiny, name), dest / name)
    return dest


def read_st(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_header(path: Path, fn):
    header, data = read_st(path)
    fn(header)
    write_st(path, header, data)


def edit_json(path: Path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def drop_tensor(src: Path, name: str, from_index: bool = True):
    """Remove tensor `name` from S2 (rewriting the data section) and, optionally, from the index."""
    header, data = read_st(src / S2)
    keep = {k: v for k, v in header.items() if k != name}
    out, pos = bytearray(), 0
    for k, v in sorted(((k, v) for k, v in keep.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"]):
        a, b = v["data_offsets"]
        out += data[a:b]
        v["data_offsets"] = [pos, pos + b - a]
        pos += b - a
    write_st(src / S2, keep, bytes(out))
    if from_index:
        edit_json(src / INDEX, lambda ix: ix["weight_map"].pop(name))


def add_tensor(path: Path, name: str, shape, dtype="F16"):
    header, data = read_st(path)
    n = int(np.prod(shape)) * 2
    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + n]}
    write_st(path, header, data + bytes(n))


# ---- the damage: each takes the private copy (and a scratch folder) and returns the words the error must hold


def truncated_shard(src, tmp):
    raw = (src / S1).read_bytes()
    (src / S1).write_bytes(raw[:len(raw) - 1000])
    return [S1, "truncated"]


def empty_shard(src, tmp):
    (src / S3).write_bytes(b"")
    return [S3, "truncated"]


def header_length_absurd(src, tmp):
    raw = bytearray((src / S2).read_bytes())
    raw[:8] = struct.pack("<Q", 2 ** 62)
    (src / S2).write_bytes(bytes(raw))
    return [S2, "header length"]


def header_length_max_u64(src, tmp):
    raw = bytearray((src / S2).read_bytes())
    raw[:8] = b"\xff" * 8
    (src / S2).write_bytes(bytes(raw))
    return [S2, "header length"]


def header_not_json(src, tmp):
    raw = bytearray((src / S2).read_bytes())
    raw[8:20] = b"#!not json!#"
    (src / S2).write_bytes(bytes(raw))
    return [S2, "not valid JSON"]


def header_not_utf8(src, tmp):
    raw = bytearray((src / S2).read_bytes())
    raw[9:12] = b"\xff\xfe\xfd"
    (src / S2).write_bytes(bytes(raw))
    return [S2, "not valid JSON"]


def header_not_object(src, tmp):
    write_st(src / S2, [1, 2, 3], b"")
    return [S2, "not a JSON object"]


def offsets_out_of_bounds(src, tmp):
    def grow(h):
        a, b = h[L1 + "mlp.up_proj.weight"]["data_offsets"]
        h[L1 + "mlp.up_proj.weight"]["data_offsets"] = [a + 10 ** 9, b + 10 ** 9]
    edit_header(src / S2, grow)
    return [S2, L1 + "mlp.up_proj.weight", "out of bounds"]


def offsets_overlap(src, tmp):
    def overlap(h):  # same size, shifted onto the tensor before it
        h[L1 + "mlp.up_proj.weight"]["data_offsets"] = list(h[L1 + "mlp.gate_proj.weight"]["data_offsets"])
    edit_header(src / S2, overlap)
    return [S2, "overlap"]


def offsets_contradict_shape(src, tmp):
    edit_header(src / S2, lambda h: h[L1 + "input_layernorm.weight"].update(shape=[65]))
    return [S2, L1 + "input_layernorm.weight", "do not match"]


def negative_shape(src, tmp):
    edit_header(src / S2, lambda h: h[L1 + "input_layernorm.weight"].update(shape=[-64]))
    return [S2, "invalid shape"]


def unsupported_dtype_i64(src, tmp):
    edit_header(src / S2, lambda h: h[L1 + "input_layernorm.weight"].update(dtype="I64", shape=[16]))
    return [S2, "unsupported dtype 'I64'"]


def unsupported_dtype_f64(src, tmp):
    edit_header(src / S2, lambda h: h[L1 + "input_layernorm.weight"].update(dtype="F64", shape=[16]))
    return [S2, "unsupported dtype 'F64'"]


def index_dotdot(src, tmp):
    (src.parent / "evil.safetensors").write_bytes((src / S2).read_bytes())  # exists, so only the path is wrong
    edit_json(src / INDEX, lambda ix: ix["weight_map"].update({L1 + "input_layernorm.weight": "../evil.safetensors"}))
    return [INDEX, "../evil.safetensors", "not a plain name"]


def index_absolute(src, tmp):
    edit_json(src / INDEX, lambda ix: ix["weight_map"].update({L1 + "input_layernorm.weight": str(src / S2)}))
    return [INDEX, str(src / S2), "not a plain name"]


def index_missing_file(src, tmp):
    (src / S2).rename(src / "elsewhere.safetensors")
    return [INDEX, S2, "missing"]


def index_not_json(src, tmp):
    (src / INDEX).write_text("{ weight_map: oops")
    return [INDEX, "not a valid safetensors index"]


def index_names_pickle(src, tmp):
    marker = tmp / "UNPICKLED"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(str(marker))))
    edit_json(src / INDEX, lambda ix: ix["weight_map"].update({L1 + "input_layernorm.weight": "pytorch_model.bin"}))
    return ["pytorch_model.bin", "pickle"]


def index_names_a_fifo(src, tmp):  # opening a FIFO blocks forever: it must be refused without opening it
    (src / S2).unlink()
    os.mkfifo(src / S2)
    return [S2, "not a regular file"]


def index_is_a_fifo(src, tmp):
    (src / INDEX).unlink()
    os.mkfifo(src / INDEX)
    return [INDEX, "not a regular file"]


def tensor_in_two_shards(src, tmp):
    add_tensor(src / S3, L1 + "input_layernorm.weight", [64])
    return [L1 + "input_layernorm.weight", src / S2, src / S3, "two files"]


def missing_tensor(src, tmp):
    drop_tensor(src, L1 + "mlp.up_proj.weight")
    return [str(src), "missing tensors", L1 + "mlp.up_proj.weight"]


def index_lists_absent_tensor(src, tmp):
    drop_tensor(src, L1 + "mlp.up_proj.weight", from_index=False)
    return [src / INDEX, L1 + "mlp.up_proj.weight", "no file holds it"]


def index_points_to_wrong_shard(src, tmp):
    edit_json(src / INDEX, lambda ix: ix["weight_map"].update({L1 + "input_layernorm.weight": S3}))
    return [INDEX, L1 + "input_layernorm.weight", f"in {S3}, but it is in {S2}"]


def extra_tensor(src, tmp):
    add_tensor(src / S2, L1 + "mlp.extra.weight", [4, 4])
    edit_json(src / INDEX, lambda ix: ix["weight_map"].update({L1 + "mlp.extra.weight": S2}))
    return [str(src), "unexpected tensors", L1 + "mlp.extra.weight"]


def extra_tensor_not_in_index(src, tmp):
    add_tensor(src / S2, L1 + "mlp.extra.weight", [4, 4])
    return [src / S2, L1 + "mlp.extra.weight", "does not list"]


def shape_contradicts_config(src, tmp):
    edit_json(src / "config.json", lambda c: c["text_config"].update(vocab_size=32000))
    return [S1, "embed_tokens", "[32064, 64]", "config.json implies [32000, 64]"]


def config_not_llava(src, tmp):
    edit_json(src / "config.json", lambda c: c.update(model_type="llama"))
    return ["config.json", "not a LLaVA config", "'llama'"]


def config_not_json(src, tmp):
    (src / "config.json").write_text('{"model_type": "llava",')
    return ["config.json", "not valid JSON"]


def config_missing(src, tmp):
    (src / "config.json").unlink()
    return ["config.json", str(src)]


def config_bad_size(src, tmp):
    edit_json(src / "config.json", lambda c: c["text_config"].update(hidden_size="64"))
    return ["config.json", "hidden_size must be a positive integer"]


def config_heads_zero(src, tmp):
    edit_json(src / "config.json", lambda c: c["text_config"].update(num_attention_heads=0))
    return ["config.json", "num_attention_heads must be a positive integer"]


def config_is_a_fifo(src, tmp):  # opening a FIFO blocks forever
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")
    return ["config.json", "not a regular file"]


def config_is_dev_zero(src, tmp):  # endless: must not be read to the end
    (src / "config.json").unlink()
    (src / "config.json").symlink_to("/dev/zero")
    return ["config.json"]


class _Evil:
    """Unpickling this creates a marker folder: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def only_pickle_weights(src, tmp):
    for name in (S1, S2, S3, INDEX):
        (src / name).unlink()
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(str(tmp / "UNPICKLED"))))
    return [str(src), "pickle", "pytorch_model.bin", "never unpickled"]


def shard_symlink_escapes(src, tmp):
    outside = src.parent / "outside.safetensors"
    (src / S2).rename(outside)
    (src / S2).symlink_to(outside)
    return [INDEX, S2, "resolves outside the checkpoint folder"]


def index_symlink_escapes(src, tmp):
    outside = src.parent / "outside.json"
    (src / INDEX).rename(outside)
    (src / INDEX).symlink_to(outside)
    return [INDEX, "resolves outside the checkpoint folder"]


def src_is_missing(src, tmp):
    shutil.rmtree(src)
    return [str(src)]


def src_is_a_file(src, tmp):
    shutil.rmtree(src)
    src.write_text("hello")
    return [str(src)]


CASES = [truncated_shard, empty_shard, header_length_absurd, header_length_max_u64, header_not_json,
         header_not_utf8, header_not_object, offsets_out_of_bounds, offsets_overlap, offsets_contradict_shape,
         negative_shape, unsupported_dtype_i64, unsupported_dtype_f64, index_dotdot, index_absolute,
         index_missing_file, index_not_json, index_names_pickle, index_names_a_fifo, index_is_a_fifo,
         tensor_in_two_shards, missing_tensor, index_lists_absent_tensor, index_points_to_wrong_shard,
         extra_tensor, extra_tensor_not_in_index, shape_contradicts_config, config_not_llava, config_not_json,
         config_missing,
         config_bad_size, config_heads_zero, config_is_a_fifo, config_is_dev_zero,
         only_pickle_weights, shard_symlink_escapes, index_symlink_escapes, src_is_missing, src_is_a_file]


def _name(case):
    return (case.values[0] if hasattr(case, "values") else case).__name__


def _limit_memory():
    # 2 GiB of address space: plenty for the CLI, far too little for any absurd header length taken at its word
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.parametrize("damage", CASES, ids=[_name(c) for c in CASES])
def test_bad_checkpoint_is_refused_cleanly(tiny, tmp_path, damage):
    src = copy_src(tiny, tmp_path / "src")
    words = damage(src, tmp_path)
    out = tmp_path / "out"
    start = time.monotonic()
    # fails fast, in bounded memory: nothing is read beyond headers and small JSON files (a hang is a failure)
    proc = run("convert", src, out, "--tp", 2, preexec_fn=_limit_memory, timeout=8)
    assert_clean_failure(proc, out, *words)
    assert time.monotonic() - start < 8
    assert not (tmp_path / "UNPICKLED").exists()


def test_every_case_really_is_damaged(tiny, tmp_path):
    """The undamaged copy converts: so each refusal above is caused by its damage, not by the harness."""
    src = copy_src(tiny, tmp_path / "src")
    proc = run("convert", src, tmp_path / "out", "--tp", 2)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()


# ---- bad requests and bad places to write ---------------------------------------------------------------


def test_tp_that_does_not_divide(tiny, tmp_path):
    proc = run("convert", tiny, tmp_path / "out", "--tp", 3)
    assert_clean_failure(proc, tmp_path / "out", "--tp 3", "Valid: 1, 2, 4")


@pytest.mark.parametrize("tp", ["0", "-2"])
def test_tp_not_positive(tiny, tmp_path, tp):
    proc = run("convert", tiny, tmp_path / "out", "--tp", tp)
    assert_clean_failure(proc, tmp_path / "out", f"--tp must be a positive integer, got {int(tp)}")


def test_out_is_a_file(tiny, tmp_path):
    out = tmp_path / "out"
    out.write_text("precious")
    proc = run("convert", tiny, out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: output {out} exists and is not a folder")
    assert out.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_out_parent_is_a_file(tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    proc = run("convert", tiny, out)
    assert_clean_failure(proc, tmp_path / "elsewhere", f"is not a folder: {tmp_path / 'file'}")
    assert (tmp_path / "file").read_text() == "x"


def test_out_inside_src(tiny, tmp_path):
    src = copy_src(tiny, tmp_path / "src")
    before = sorted(os.listdir(src))
    proc = run("convert", src, src / "converted")
    assert_clean_failure(proc, src / "converted", "inside the source checkpoint", str(src))
    assert sorted(os.listdir(src)) == before


def test_out_is_someone_elses_folder(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = run("convert", tiny, out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: output folder {out} is not empty and holds no llava-ckpt manifest")
    assert os.listdir(out) == ["notes.txt"]


def _without_dac_override():
    """Drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from the bounding set, so that root, after
    exec, obeys permission bits like anyone else (root would otherwise write into a mode-555 folder)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_out_not_writable(tiny, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    preexec = _without_dac_override if os.geteuid() == 0 else None
    try:
        probe = subprocess.run(["sh", "-c", f"touch {locked}/probe"], preexec_fn=preexec, capture_output=True)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot drop root's permission override here ({exc})")
    if probe.returncode == 0:
        pytest.skip("permission bits are not enforced for this user here")
    proc = run("convert", tiny, locked / "out", preexec_fn=preexec)
    assert_clean_failure(proc, locked / "out", "cannot write in", str(locked), "permission denied")
    assert os.listdir(locked) == []


# ---- faults while writing ---------------------------------------------------------------------------------


def _file_size_limit(limit):
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return setup


@pytest.mark.parametrize("tp", [1, 4])
def test_disk_full_while_writing(tiny, tmp_path, tp):
    out = tmp_path / "out"
    proc = run("convert", tiny, out, "--tp", tp, preexec_fn=_file_size_limit(1 << 20))
    assert_clean_failure(proc, out, "File too large", str(out))


def test_disk_full_on_rerun_keeps_the_previous_output(tiny, tmp_path):
    out = tmp_path / "out"
    assert run("convert", tiny, out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run("convert", tiny, out, "--dtype", "float32", "--overwrite", preexec_fn=_file_size_limit(1 << 20))
    assert proc.returncode == 2 and proc.stderr.startswith("error: File too large") and proc.stderr.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.fixture(scope="module")
def big(tiny_factory):
    return tiny_factory(text_overrides=BIG)


def _wait_for_bytes(out: Path, proc, at_least: int, timeout=30):
    """Wait until the staging folder beside OUT holds `at_least` bytes of weights; False if the run ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if staged_bytes(out)[1] >= at_least:
            return True
        time.sleep(0.002)
    return False


def interrupt_mid_write(args, out: Path, sig=signal.SIGTERM) -> subprocess.CompletedProcess:
    """Run the CLI with `args`, send `sig` once 20 MiB of OUT is staged, and return how the run ended."""
    proc = subprocess.Popen([EXE] + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert _wait_for_bytes(out, proc, 20 << 20), "the run ended before it could be interrupted"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("tp", [1, 4])
def test_signal_mid_write(big, tmp_path, sig, tp):
    out = tmp_path / "out"
    proc = interrupt_mid_write(["convert", big, out, "--tp", tp], out, sig)
    assert_clean_failure(proc, out, f"interrupted by {signal.Signals(sig).name}", str(out))


# ---- shard: hostile converted folders ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """A .ckpt output: the cases damage .ckpt records (the safetensors header is hostile.py's other half)."""
    out = tmp_path_factory.mktemp("conv") / "one"
    proc = run("convert", tiny, out, "--format", "ckpt")
    assert proc.returncode == 0, proc.stderr
    return out


def _records(path: Path):
    """name -> (offset, length) of each tensor's data in a .ckpt, by the package's own parser."""
    from llava_ckpt.io.readers import read_ckpt_index
    return {name: info.pieces[0] for name, info in read_ckpt_index(str(path)).items()}


def ckpt_truncated(conv, tmp):
    """The manifest records the size: the truncation is named before the file is read."""
    raw = (conv / "llava.ckpt").read_bytes()
    (conv / "llava.ckpt").write_bytes(raw[:len(raw) // 2])
    return ["llava.ckpt", f"{len(raw) // 2} bytes, its manifest records {len(raw)}", "truncated"]


def ckpt_garbage(conv, tmp):
    """Garbage of the recorded size: the reader's own checks refuse it."""
    size = (conv / "llava.ckpt").stat().st_size
    (conv / "llava.ckpt").write_bytes(b"\x0f" * size)
    return ["llava.ckpt", "not a valid MindSpore .ckpt"]


def ckpt_empty(conv, tmp):
    (conv / "llava.ckpt").write_bytes(b"")
    return ["llava.ckpt", "0 bytes, its manifest records"]


def ckpt_flipped_data_byte(conv, tmp):
    offset, length = _records(conv / "llava.ckpt")["language_model.model.layers.1.feed_forward.w2.weight"]
    with open(conv / "llava.ckpt", "r+b") as f:
        f.seek(offset + length // 2)
        b = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    return ["llava.ckpt", "sha256", "corrupted"]


def ckpt_missing(conv, tmp):
    (conv / "llava.ckpt").unlink()
    return ["no llava.ckpt or llava.safetensors", str(conv)]


def manifest_not_json(conv, tmp):
    (conv / "manifest.json").write_text("{")
    return ["manifest.json", "not valid JSON"]


def manifest_not_ours(conv, tmp):
    edit_json(conv / "manifest.json", lambda m: m.update(tool="something-else"))
    return ["manifest.json", "not a llava-ckpt manifest"]


def manifest_lists_absent_tensor(conv, tmp):
    edit_json(conv / "manifest.json", lambda m: m["tensors"].append(dict(m["tensors"][0], name="ghost.weight")))
    return ["llava.ckpt", "does not match its manifest", "ghost.weight"]


def manifest_wrong_shape(conv, tmp):
    def lie(m):
        m["tensors"][1]["shape"] = [m["tensors"][1]["shape"][0] * 2] + m["tensors"][1]["shape"][1:]
    edit_json(conv / "manifest.json", lie)
    return ["llava.ckpt", "the manifest says"]


def manifest_tensors_not_a_list(conv, tmp):
    edit_json(conv / "manifest.json", lambda m: m.update(tensors="abc"))
    return ["manifest.json", "tensors"]


def manifest_entry_without_shape(conv, tmp):
    edit_json(conv / "manifest.json", lambda m: m["tensors"][0].pop("shape"))
    return ["manifest.json", "shape"]


def manifest_unknown_split(conv, tmp):
    edit_json(conv / "manifest.json", lambda m: m["tensors"][0].update(split="diagonal"))
    return ["manifest.json", "diagonal"]


def manifest_mapping_not_an_object(conv, tmp):
    edit_json(conv / "manifest.json", lambda m: m.update(mapping="llava"))
    return ["manifest.json", "'mapping' is not an object"]


def manifest_already_split(conv, tmp):
    """The manifest claims rank folders that are not there (shard takes tp-N outputs, but not this one)."""
    edit_json(conv / "manifest.json", lambda m: m.update(tp=2))
    return [str(conv), "records tp 2", "rank_0, rank_1 missing"]


# (a folder whose manifest was removed is a bare checkpoint with LlavaVlm names, which shard takes: tests/test_shard.py)
SHARD_CASES = [ckpt_truncated, ckpt_garbage, ckpt_empty, ckpt_flipped_data_byte, ckpt_missing,
               manifest_not_json, manifest_not_ours, manifest_lists_absent_tensor, manifest_wrong_shape,
               manifest_already_split, manifest_tensors_not_a_list, manifest_entry_without_shape,
               manifest_unknown_split, manifest_mapping_not_an_object]


@pytest.mark.parametrize("damage", SHARD_CASES, ids=[_name(c) for c in SHARD_CASES])
def test_bad_converted_folder_is_refused_by_shard(converted, tmp_path, damage):
    conv = tmp_path / "conv"
    shutil.copytree(converted, conv)
    words = damage(conv, tmp_path)
    out = tmp_path / "out"
    proc = run("shard", conv, out, "--tp", 2, preexec_fn=_limit_memory)
    assert_clean_failure(proc, out, *words)


def test_shard_of_the_undamaged_copy_works(converted, tmp_path):
    conv = tmp_path / "conv"
    shutil.copytree(converted, conv)
    proc = run("shard", conv, tmp_path / "out", "--tp", 2)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "rank_1" / "llava.ckpt").is_file()


def test_sigterm_while_replacing_keeps_the_previous_output(big, tmp_path):
    out = tmp_path / "out"
    assert run("convert", big, out).returncode == 0
    before = {p.name: p.stat().st_size for p in out.iterdir()}
    proc = interrupt_mid_write(["convert", big, out, "--tp", 2, "--overwrite"], out)
    stderr = proc.stderr
    assert proc.returncode == 2 and stderr.startswith("error: interrupted by SIGTERM") and stderr.count("\n") == 1
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

import ml_dtypes
import numpy as np

from llava_ckpt.io import writers
from llava_ckpt.io.readers import FileReader, read_ckpt_index


def _write(path, arrays):
    codes = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
    w = writers.CkptWriter(str(path))
    for name, a in arrays.items():
        w.begin(name, a.shape, codes[a.dtype], a.nbytes)
        flat = a.reshape(-1).view(np.uint8)
        for i in range(0, len(flat), 7):  # odd chunk sizes cross record boundaries
            w.write(flat[i:i + 7])
        w.end()
    return w.close()


def test_ckpt_splits_large_tensors_like_mindspore(tmp_path, monkeypatch):
    import mindspore as ms
    from mindspore.train import serialization
    rng = np.random.default_rng(1)
    arrays = {"big": rng.standard_normal((40, 30)).astype(np.float32),  # 4800 bytes: 5 records of 1 KiB
              "small.bf16": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16)}
    monkeypatch.setattr(writers, "CKPT_SLICE", 1024)
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # MindSpore's record size is 1024 * SLICE_SIZE bytes
    _write(tmp_path / "ours.ckpt", arrays)
    ms.save_checkpoint([{"name": "big", "data": ms.Tensor(arrays["big"])},
                        {"name": "small.bf16", "data": ms.Tensor(arrays["small.bf16"].astype(np.float32),
                                                                 dtype=ms.bfloat16)}], str(tmp_path / "ms.ckpt"))
    assert (tmp_path / "ours.ckpt").read_bytes() == (tmp_path / "ms.ckpt").read_bytes()
    index = read_ckpt_index(str(tmp_path / "ours.ckpt"))
    assert len(index["big"].pieces) == 5
    with FileReader() as r:
        assert np.array_equal(r.read(index["big"]), arrays["big"])
        assert np.array_equal(r.read_rows(index["big"], 7, 33), arrays["big"][7:33])
    loaded = ms.load_checkpoint(str(tmp_path / "ours.ckpt"))
    assert np.array_equal(loaded["big"].asnumpy(), arrays["big"])


def test_safetensors_output_reads_back_with_the_safetensors_package(tmp_path):
    from safetensors.numpy import load_file
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((4, 6)).astype(np.float16), rng.standard_normal(5).astype(np.float32)
    w = writers.SafetensorsWriter(str(tmp_path / "x.safetensors"), [("b", b.shape, "F32"), ("a", a.shape, "F16")])
    for name, arr, code in (("b", b, "F32"), ("a", a, "F16")):
        w.begin(name, arr.shape, code, arr.nbytes)
        w.write(arr.reshape(-1).view(np.uint8))
        w.end()
    w.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert np.array_equal(back["a"], a) and np.array_equal(back["b"], b)


def test_falls_back_to_buffered_writes_where_o_direct_is_refused(tmp_path, monkeypatch):
    """tmpfs and some network filesystems refuse O_DIRECT: the output must be the same bytes regardless."""
    import errno
    import os
    rng = np.random.default_rng(3)
    arrays = {"w": rng.standard_normal((700, 9)).astype(np.float32)}  # not a multiple of the 4 KiB alignment
    direct = _write(tmp_path / "direct.ckpt", arrays)
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT refused")
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", refuse_direct)
    buffered = _write(tmp_path / "buffered.ckpt", arrays)
    assert direct == buffered
    assert (tmp_path / "direct.ckpt").read_bytes() == (tmp_path / "buffered.ckpt").read_bytes()
    with FileReader() as r:
        assert np.array_equal(r.read(read_ckpt_index(str(tmp_path / "direct.ckpt"))["w"]), arrays["w"])


def test_safetensors_index(tmp_path):
    import json
    sha = writers.write_safetensors_index(str(tmp_path / "i.json"), {"b": "f2", "a": "f1"}, 1234)
    raw = (tmp_path / "i.json").read_bytes()
    import hashlib
    assert hashlib.sha256(raw).hexdigest() == sha
    index = json.loads(raw)
    assert index == {"metadata": {"total_size": 1234}, "weight_map": {"a": "f1", "b": "f2"}}
    assert list(index["weight_map"]) == ["a", "b"]


def test_training_counters_are_indexed_only_when_asked(tmp_path):
    import pytest
    from safetensors.numpy import save_file
    from llava_ckpt.errors import CheckpointError
    from llava_ckpt.io.readers import read_index
    save_file({"w": np.ones(3, np.float32), "global_step": np.array([7], np.int32)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(CheckpointError, match="unsupported dtype 'I32'"):
        read_index(str(tmp_path / "t.safetensors"))
    infos = read_index(str(tmp_path / "t.safetensors"), other_dtypes=True)
    assert infos["global_step"].dtype == "I32" and infos["w"].dtype == "F32"
    arrays = {"w": np.ones((2, 3), np.float32)}
    _write(tmp_path / "t.ckpt", arrays)
    assert read_index(str(tmp_path / "t.ckpt"), other_dtypes=True)["w"].shape == (2, 3)


def test_a_ckpt_too_large_for_mindspores_loader_here_is_warned_about(tiny, tmp_path, monkeypatch):
    """MindSpore's load_checkpoint needs about 3x a .ckpt's size free (it reads it whole, then wants its size
    still free): convert says so for a .ckpt above an eighth of the host's memory; safetensors never."""
    from click.testing import CliRunner
    import llava_ckpt.io.writers as writers
    from llava_ckpt.cli import main
    from llava_ckpt.convert import convert
    assert writers.ckpt_load_warning("x", 3 << 30, memory=24 << 30) is None
    assert "x is a 3.1 GiB .ckpt" in writers.ckpt_load_warning("x", 3 << 30 | 1 << 27, memory=24 << 30)
    monkeypatch.setattr(writers, "host_memory", lambda: 8 << 20)  # a host of 8 MiB: the tiny .ckpt is 12 MB
    one = convert(tiny, str(tmp_path / "one"), fmt="ckpt", progress=False)
    (warning,) = one["warnings"]
    assert warning.startswith("llava.ckpt is a 0.0 GiB .ckpt: MindSpore's load_checkpoint reads a .ckpt whole")
    two = convert(tiny, str(tmp_path / "two"), fmt="ckpt", tp=2, progress=False)
    assert two["warnings"][0].startswith("each of llava.ckpt of the 2 rank folders is a")
    assert convert(tiny, str(tmp_path / "st"), progress=False)["warnings"] == []  # the default: safetensors
    cli = CliRunner().invoke(main, ["convert", tiny, str(tmp_path / "cli"), "--format", "ckpt"])
    assert cli.exit_code == 0 and "warning: llava.ckpt is a" in cli.stderr

"""Bad and hostile inputs to `export`, each made on the fly from converted tiny checkpoints and run through the
real CLI. Every case must end with exit code 2, one `error: ...` line naming the problem, no traceback and
nothing at HF_OUT that looks complete (test_hostile.assert_clean_failure)."""
import shutil
import struct
from pathlib import Path

import pytest

from test_hostile import (_limit_memory, assert_clean_failure, edit_header, edit_json, read_st, run,
                          write_st)
from test_hostile import big  # noqa: F401  (a fixture: a model large enough to interrupt mid-write)

L1 = "language_model.model.layers.1."
NORM = L1 + "attention_norm.weight"       # replicated, 1-D [64]
WO = L1 + "attention.wo.weight"           # row split


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory):
    """A tp-1 safetensors convert output, a tp-2 .ckpt one, and a bare 2-rank set (no manifest) made from it."""
    root = tmp_path_factory.mktemp("exp-src")
    for args, name in ((["--format", "safetensors"], "one"), (["--tp", "2", "--format", "ckpt"], "tp2")):
        proc = run("convert", tiny, root / name, *args)
        assert proc.returncode == 0, proc.stderr
    ranks = root / "ranks"
    ranks.mkdir()
    for r in range(2):
        shutil.copytree(root / "tp2" / f"rank_{r}", ranks / f"rank_{r}")
    shutil.copyfile(root / "tp2" / "strategy.ckpt", ranks / "strategy.ckpt")
    shutil.copyfile(root / "tp2" / "config.json", ranks / "config.json")
    return root


def bare(made, tmp):
    """A bare MindSpore safetensors file and a config.json beside it in a folder of its own."""
    src = tmp / "src"
    src.mkdir()
    shutil.copyfile(made / "one" / "llava.safetensors", src / "llava.safetensors")
    shutil.copyfile(made / "one" / "config.json", src / "config.json")
    return src


def drop(path: Path, name: str):
    header, data = read_st(path)
    del header[name]
    write_st(path, header, data)  # the bytes stay; only the header forgets the tensor


# ---- the damage: each takes the prepared sources and a scratch folder, returns (MS_SRC, extra args, words)


def missing_tensor(made, tmp):
    src = bare(made, tmp)
    drop(src / "llava.safetensors", NORM)
    return src, [], ["missing tensors", NORM]


def wrong_shape(made, tmp):
    src = bare(made, tmp)

    def shrink(h):
        a, _ = h[NORM]["data_offsets"]
        h[NORM].update(shape=[32], data_offsets=[a, a + 64])
    edit_header(src / "llava.safetensors", shrink)
    return src, [], ["llava.safetensors", NORM, "[32]", "config.json implies [64]"]


def append(path: Path, name: str, dtype: str, shape, nbytes: int):
    header, data = read_st(path)
    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + nbytes]}
    write_st(path, header, data + bytes(nbytes))


def unknown_tensor(made, tmp):
    src = bare(made, tmp)
    append(src / "llava.safetensors", "language_model.model.layers.1.attention.extra.weight", "F16", [64], 128)
    return src, [], ["does not know", "attention.extra.weight"]


def unknown_integer_tensor(made, tmp):
    src = bare(made, tmp)
    append(src / "llava.safetensors", "token_counter", "I32", [1], 4)
    return src, [], ["token_counter", "I32"]


def config_contradicts_shapes(made, tmp):
    src = bare(made, tmp)
    edit_json(src / "config.json", lambda c: c["text_config"].update(intermediate_size=96))
    return src, [], ["feed_forward", "[128, 64]", "config.json implies [96, 64]"]


def config_option_contradicts_shapes(made, tmp):
    """MS_SRC carries no config of its own: the shapes are all there is to check --config against."""
    src = bare(made, tmp)
    (src / "config.json").unlink()
    cfg = tmp / "other-config.json"
    shutil.copyfile(made / "one" / "config.json", cfg)
    edit_json(cfg, lambda c: c["text_config"].update(vocab_size=32000))
    return src, ["--config", cfg], ["tok_embeddings", "[32064, 64]", "implies [32000, 64]"]


def config_option_contradicts_own_config(made, tmp):
    """A convert output carries its config: --config must agree with it, key by key."""
    cfg = tmp / "other-config.json"
    shutil.copyfile(made / "one" / "config.json", cfg)
    edit_json(cfg, lambda c: c["text_config"].update(vocab_size=32000))
    return made / "one", ["--config", cfg], ["contradicts MS_SRC's own config", "text_config.vocab_size",
                                             "32000 there, 32064 in"]


SAME_SHAPES_OTHER_HEADS = {"num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 8}  # 8 x 8 = 4 x 16


def config_option_other_heads_same_shapes(made, tmp):
    """Other head counts, same shapes (q/k/v rows would come back scrambled with exit 0): MS_SRC's own
    config names the key and both values."""
    cfg = tmp / "other-config.json"
    shutil.copyfile(made / "one" / "config.json", cfg)
    edit_json(cfg, lambda c: c["text_config"].update(SAME_SHAPES_OTHER_HEADS))
    return made / "one", ["--config", cfg], ["text_config.num_attention_heads", "8 there, 4 in"]


def config_grouping_contradicts_manifest(made, tmp):
    """Even where MS_SRC's own config.json says the same as --config (edited to match), its manifest records
    how the rows were grouped when it was converted."""
    src = tmp / "src"
    shutil.copytree(made / "one", src)
    edit_json(src / "config.json", lambda c: c["text_config"].update(SAME_SHAPES_OTHER_HEADS))
    return src, ["--config", src / "config.json"], ["in 8 groups", "manifest.json records", "in 4 groups",
                                                     "converted with another config"]


def config_not_an_object(made, tmp):
    src = bare(made, tmp)
    (src / "config.json").write_text("[1, 2]")
    return src, [], ["config.json", "not a JSON object"]


def no_config(made, tmp):
    src = bare(made, tmp)
    (src / "config.json").unlink()
    return src, [], ["carries no config.json", "--config"]


def config_option_missing(made, tmp):
    return made / "one", ["--config", tmp / "nowhere"], ["--config", "does not exist"]


def flipped_data_byte(made, tmp):
    src = tmp / "src"
    shutil.copytree(made / "one", src)
    header, _ = read_st(src / "llava.safetensors")
    (n,) = struct.unpack("<Q", (src / "llava.safetensors").read_bytes()[:8])
    a, b = header[WO]["data_offsets"]
    with open(src / "llava.safetensors", "r+b") as f:
        f.seek(8 + n + (a + b) // 2)
        byte = f.read(1)
        f.seek(8 + n + (a + b) // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    return src, [], ["llava.safetensors", "sha256", "corrupted"]


def damaged_rank_file(made, tmp):
    """Rank folders without a manifest: the file's own records show the damage."""
    src = tmp / "src"
    shutil.copytree(made / "ranks", src)
    raw = (src / "rank_1" / "llava.ckpt").read_bytes()
    (src / "rank_1" / "llava.ckpt").write_bytes(raw[:len(raw) // 2])
    return src, [], ["rank_1", "llava.ckpt", "not a valid MindSpore .ckpt"]


def truncated_rank_file_of_an_output(made, tmp):
    """A shard output's manifest records every file's size: the truncation is named before anything is read."""
    src = tmp / "src"
    shutil.copytree(made / "tp2", src)
    raw = (src / "rank_1" / "llava.ckpt").read_bytes()
    (src / "rank_1" / "llava.ckpt").write_bytes(raw[:len(raw) // 2])
    return src, [], ["rank_1/llava.ckpt", f"{len(raw) // 2} bytes, its manifest records {len(raw)}", "truncated"]


def missing_rank_file(made, tmp):
    src = tmp / "src"
    shutil.copytree(made / "tp2", src)
    (src / "rank_1" / "llava.ckpt").unlink()
    return src, [], ["rank_1", "missing rank file"]


def missing_rank_folder(made, tmp):
    src = tmp / "src"
    shutil.copytree(made / "ranks", src)
    shutil.copytree(src / "rank_1", src / "rank_2")
    shutil.rmtree(src / "rank_1")
    return src, [], ["rank_1 missing"]


def replicas_differ(made, tmp):
    src = tmp / "src"
    shutil.copytree(made / "ranks", src)
    from llava_ckpt.io.readers import read_ckpt_index
    offset, length = read_ckpt_index(str(src / "rank_1" / "llava.ckpt"))[NORM].pieces[0]
    with open(src / "rank_1" / "llava.ckpt", "r+b") as f:
        f.seek(offset + 10)
        f.write(b"\x7f\x7f")
    return src, [], [NORM, "differs between rank 0 and rank 1"]


def rank_lacks_tensor(made, tmp):
    src = tmp / "src"
    shutil.copytree(made / "ranks", src)
    (src / "rank_1" / "llava.ckpt").write_bytes(_ckpt_without(src / "rank_1" / "llava.ckpt", WO))
    return src, [], ["rank_1", f"lacks '{WO}'"]


def _ckpt_without(path: Path, name: str) -> bytes:
    """The .ckpt with the record of `name` cut out (records are top-level protobuf fields)."""
    from llava_ckpt.io.protobuf import fields
    raw = path.read_bytes()
    keep, pos = bytearray(), 0
    from llava_ckpt.io.readers import read_ckpt_index
    data_offset = read_ckpt_index(str(path))[name].pieces[0][0]
    for _, _, (a, b) in fields(raw, 0, len(raw)):
        start = pos
        pos = b
        if not a <= data_offset < b:
            keep += raw[start:b]
    return bytes(keep)


def no_strategy(made, tmp):
    src = tmp / "src"
    shutil.copytree(made / "ranks", src)
    (src / "strategy.ckpt").unlink()
    return src, [], ["no strategy file"]


def strategy_garbage(made, tmp):
    src = tmp / "src"
    shutil.copytree(made / "ranks", src)
    (src / "strategy.ckpt").write_bytes(b"\xff" * 64)
    return src, [], ["strategy.ckpt", "malformed"]


def strategy_for_other_rank_count(made, tmp):
    src = tmp / "src"
    shutil.copytree(made / "ranks", src)
    from llava_ckpt.io.readers import read_ckpt_index
    from llava_ckpt.io.strategy import write_strategy
    names = list(read_ckpt_index(str(src / "rank_0" / "llava.ckpt")))
    write_strategy(src / "strategy.ckpt", [(n, "replicated", 1) for n in names], 4)
    return src, [], ["4 devices", "2 ranks"]


def out_inside_src(made, tmp):
    src = tmp / "src"
    shutil.copytree(made / "one", src)
    return src, [], ["inside the source checkpoint"]


def src_missing(made, tmp):
    return tmp / "nothing-here", [], ["does not exist"]


def src_not_a_checkpoint(made, tmp):
    (tmp / "notes.txt").write_text("hello")
    return tmp / "notes.txt", [], ["expected a MindSpore .ckpt or .safetensors"]


def src_is_an_export(made, tmp):
    proc = run("export", made / "one", tmp / "hf")
    assert proc.returncode == 0, proc.stderr
    return tmp / "hf", [], ["output of llava-ckpt export"]


def manifest_source_file_escapes(made, tmp):
    src = tmp / "src"
    shutil.copytree(made / "one", src)
    edit_json(src / "manifest.json", lambda m: m["tensors"][0].update(source_files=["../evil.safetensors"]))
    return src, [], ["manifest.json", "../evil.safetensors", "not a plain"]


def manifest_op_contradicts_table(made, tmp):
    src = tmp / "src"
    shutil.copytree(made / "one", src)

    def lie(m):
        entry = next(e for e in m["tensors"] if e["name"] == WO)
        entry["op"] = "concat_rows"
    edit_json(src / "manifest.json", lie)
    return src, [], ["manifest.json", WO, "concat_rows", "the table says rename"]


def rank_file_symlink_escapes(made, tmp):
    src = tmp / "src"
    shutil.copytree(made / "ranks", src)
    outside = tmp / "outside.ckpt"
    (src / "rank_1" / "llava.ckpt").rename(outside)
    (src / "rank_1" / "llava.ckpt").symlink_to(outside)
    return src, [], ["rank_1", "resolves outside"]


def bad_shard_size(made, tmp):
    return made / "one", ["--max-shard-size", "lots"], ["--max-shard-size", "lots"]


CASES = [missing_tensor, wrong_shape, unknown_tensor, unknown_integer_tensor, config_contradicts_shapes,
         config_option_contradicts_shapes, config_option_contradicts_own_config,
         config_option_other_heads_same_shapes, config_grouping_contradicts_manifest, config_not_an_object, no_config, config_option_missing,
         flipped_data_byte, damaged_rank_file, truncated_rank_file_of_an_output, missing_rank_file, missing_rank_folder, replicas_differ,
         rank_lacks_tensor, no_strategy, strategy_garbage, strategy_for_other_rank_count,
         manifest_source_file_escapes, manifest_op_contradicts_table,
         rank_file_symlink_escapes, out_inside_src, src_missing,
         src_not_a_checkpoint, src_is_an_export, bad_shard_size]


@pytest.mark.parametrize("damage", CASES, ids=[c.__name__ for c in CASES])
def test_bad_source_is_refused_cleanly(made, tmp_path, damage):
    src, args, words = damage(made, tmp_path)
    out = src / "hf" if damage is out_inside_src else tmp_path / "out"
    proc = run("export", src, out, *args, preexec_fn=_limit_memory, timeout=30)
    assert_clean_failure(proc, out, *words)


@pytest.mark.parametrize("which", ["bare", "one", "tp2", "ranks"])
def test_the_undamaged_sources_export(made, tmp_path, which):
    """So each refusal above is caused by its damage, not by the harness."""
    src = bare(made, tmp_path) if which == "bare" else made / which
    proc = run("export", src, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_disk_full_while_exporting(made, tmp_path):
    from test_hostile import _file_size_limit
    out = tmp_path / "out"
    proc = run("export", made / "tp2", out, preexec_fn=_file_size_limit(1 << 20))
    assert_clean_failure(proc, out, "File too large", str(out))


def test_sigterm_mid_export_leaves_nothing(big, tmp_path):
    """Interrupted while writing: one error line, exit 2, no HF_OUT and no staging folder (shared signal handling)."""
    from test_hostile import interrupt_mid_write
    ms = tmp_path / "ms"
    assert run("convert", big, ms, "--tp", 2).returncode == 0
    out = tmp_path / "out"
    assert_clean_failure(interrupt_mid_write(["export", ms, out], out), out, "interrupted by SIGTERM", str(out))

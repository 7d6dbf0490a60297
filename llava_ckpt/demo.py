"""The download-free demo: a tiny LLaVA-1.5 checkpoint made on the spot, converted, sharded, verified, and
asked a question (one process, then two tensor-parallel ranks)."""
from __future__ import annotations

import os
import shutil
import sys

import click

from .errors import fail

MARKER = ".llava-ckpt-demo"


def _step(title: str) -> None:
    click.echo(f"\n== {title}", err=False)


def _summary(result: dict) -> None:
    click.echo(f"wrote {result['tensors']} tensors, {result['bytes']:,} bytes, tp={result['tp']}, "
               f"format {result['format']}: {', '.join(result['files'])} (+ manifest.json) in {result['out']}")


def demo(workdir: str | None = None) -> int:
    """Run every stage on a tiny synthetic checkpoint in `workdir` (default ./demo-output); return exit code."""
    from .convert import convert
    from .fixture import make_fixture
    from .shard import shard
    workdir = os.path.abspath(workdir or "demo-output")
    marker = os.path.join(workdir, MARKER)
    if os.path.isdir(workdir) and os.listdir(workdir) and not os.path.isfile(marker):
        raise fail(f"{workdir} already holds files of its own; the demo writes (and on a rerun replaces) hf-tiny, "
                   "ms-tiny and ms-tiny-tp2 there: give it an empty or new folder")
    for name in ("hf-tiny", "ms-tiny", "ms-tiny-tp2"):  # the demo's own outputs from an earlier run
        if os.path.isdir(os.path.join(workdir, name)):
            shutil.rmtree(os.path.join(workdir, name))
    os.makedirs(workdir, exist_ok=True)
    with open(marker, "w") as f:
        f.write("made by llava-ckpt demo: its outputs here are replaced when the demo runs again\n")
    hf = os.path.join(workdir, "hf-tiny")
    ms_dir = os.path.join(workdir, "ms-tiny")
    tp_dir = os.path.join(workdir, "ms-tiny-tp2")

    _step("make-fixture: a tiny HF LLaVA-1.5 checkpoint (real names, file split, tokenizer)")
    make_fixture(hf, preset="tiny")
    _step("convert: HF -> MindSpore safetensors (MindFormers LlavaVlm names, fused qkv layout)")
    _summary(convert(hf, ms_dir, fuse_qkv=True, progress=False))
    _step("shard: 2-way tensor parallel + strategy.ckpt")
    _summary(shard(ms_dir, tp_dir, tp=2, progress=False))
    passed = True
    try:
        from .verify import verify, format_report
    except ImportError as exc:  # pragma: no cover - verify ships with the package
        click.echo(f"verify unavailable: {exc}")
    else:
        for label, path, msrun in (("convert", ms_dir, False), ("shard tp=2, ranks under msrun", tp_dir, True)):
            _step(f"verify ({label}): reference MindSpore model vs transformers, same image and prompt")
            result = verify(hf, path, max_new_tokens=8, msrun=msrun)
            click.echo(format_report(result))
            passed = passed and result["passed"]
    from .generate import format_outputs, generate
    from .verify import DEFAULT_IMAGE
    question = [{"image": DEFAULT_IMAGE, "prompt": "What is in the picture?"}]
    answers = []
    for label, path in (("one process", ms_dir), ("tp=2, two ranks under msrun", tp_dir)):
        _step(f"generate ({label}): answer a question about the bundled image (random weights: gibberish)")
        result = generate(path, question, max_new_tokens=12)
        click.echo(format_outputs(result["outputs"]))
        click.echo(f"({result['outputs'][0]['token_ids']}, prefill {result['prefill_s']} s, "
                   f"{result['decode_tokens_per_s']} tokens/s)")
        answers.append(result["outputs"][0]["token_ids"])
    same = answers[0] == answers[1]
    click.echo(f"tp 1 and tp 2 give {'the same' if same else 'DIFFERENT'} tokens")
    passed = passed and same
    _step(f"outputs in {workdir}")
    for root, _, files in sorted(os.walk(workdir)):
        for name in sorted(files):
            path = os.path.join(root, name)
            click.echo(f"{os.path.getsize(path):>12,}  {os.path.relpath(path, workdir)}")
    exe = os.path.join(os.path.dirname(sys.executable), "llava-ckpt")
    click.echo(f"\nhf-tiny is the Hugging Face checkpoint, ms-tiny its conversion, ms-tiny-tp2 its 2 ranks. Try them "
               f"with the installed CLI: {os.path.relpath(exe) if exe.startswith(os.getcwd()) else exe} --help "
               f"(or `source {os.path.join(os.path.dirname(exe), 'activate')}` to have llava-ckpt on PATH), e.g. "
               f"llava-ckpt generate {os.path.join(os.path.relpath(workdir), 'ms-tiny')} --image IMG --prompt TEXT")
    click.echo("\ndemo " + ("passed" if passed else "FAILED"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(demo(sys.argv[1] if len(sys.argv) > 1 else None))

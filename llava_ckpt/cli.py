"""`llava-ckpt`: a thin click layer over the Python API. Bad input -> one `error: ...` line, exit 2."""
from __future__ import annotations

import functools
import json
import signal
import sys

import click

from .errors import CheckpointError
from .export import DEFAULT_SHARD_SIZE
from .fixture import PRESETS as FIXTURE_PRESETS
from .io import manifest as _formats


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwinds like Ctrl-C, so every `except BaseException` discards its staging dir."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signame = signal.Signals(signum).name


def _on_signal(signum, frame):
    # Ignore repeats while the first one unwinds: cleanup (closing writers, removing the staging dir) is short
    # and must not be cut off halfway. SIGKILL still ends the process, which leaves only a hidden staging dir.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def _target(kwargs: dict) -> str:
    """The output (or input) a command works on, to name it in messages that have no file of their own."""
    for key in ("out", "hf_out", "ms_dir", "local_dir", "converted_dir", "src", "repo"):
        if kwargs.get(key):
            return str(kwargs[key])
    return ""


def _clean_errors(fn):
    """Turn CheckpointError, the OS errors users cause and interruptions into one line and exit code 2.

    Interrupted runs (SIGINT, SIGTERM) also exit 2, not 130/143: every failed run of this tool ends the same
    way, with one `error:` line and exit 2, and leaves no output folder that looks complete.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        target = _target(kwargs)
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread (e.g. an embedding app): keep its handlers
            previous = {}
        try:
            return fn(*args, **kwargs)
        except CheckpointError as exc:
            _fail(str(exc))
        except OSError as exc:
            what = exc.strerror or str(exc) or exc.__class__.__name__
            if exc.filename:
                _fail(f"{what}: {exc.filename}")
            _fail(f"{what} (while working on {target})" if target else what)
        except KeyboardInterrupt as exc:
            name = getattr(exc, "signame", "SIGINT")
            _fail(f"interrupted by {name} while working on {target or 'the output'}; no partial output was "
                  "left behind (rerun the same command to finish)")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return wrapper


def _fail(message: str):
    click.echo("error: " + " ".join(str(message).splitlines()), err=True)
    sys.exit(2)


def _progress(as_json: bool) -> bool:
    """Progress bars only for a person watching: not with --json, not when stderr is a log file or pipe."""
    return not as_json and sys.stderr.isatty()


class _OneLineGroup(click.Group):
    """click's own usage errors (an unknown option, a missing argument, a value outside an option's choices) as one
    `error:` line and exit 2, like every other bad input, instead of click's usage block."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            _usage_error(exc)


def _usage_error(exc: click.UsageError):
    if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
        raise exc  # no arguments at all: click prints the help, as it should
    where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    _fail(exc.format_message() + where)


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llava-ckpt")
def main():
    """Convert, shard, verify, run (generate) and export back Hugging Face LLaVA checkpoints (LLaVA-1.5, bakLlava,
    LLaVA-NeXT) for MindSpore / MindFormers."""


DTYPES = click.Choice(["float16", "bfloat16", "float32"])
OVERWRITE = ("Replace OUT when it holds another llava-ckpt output (of another command, source or options); "
             "a rerun of the same command replaces its own output without it, and a folder holding anything "
             "else is never replaced.")
FORMAT_CHOICE = click.Choice(list(_formats.FORMATS))
DEVICE_CHOICE = click.Choice(["Ascend", "CPU", "GPU"])
DEVICE_HELP = "device_target of the MindFormers predict config written beside the weights (predict_llava.yaml)."


@main.command()
@click.argument("src")
@click.argument("out")
@click.option("--dtype", type=DTYPES, default=None, help="Cast every tensor (default: keep the source dtype).")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=_formats.DEFAULT_FORMAT, show_default=True,
              help="safetensors: MindSpore's load_checkpoint maps it at any size; ckpt: read whole (warned about "
                   "when too large for this host).")
@click.option("--fuse-qkv", is_flag=True, help="MindFormers qkv_concat layout: w_qkv and w_gate_hidden.")
@click.option("--tp", type=int, default=1, show_default=True, help="Write N tensor-parallel rank folders.")
@click.option("--revision", default=None, help="Hub revision when SRC is a repo id.")
@click.option("--mapping", default=None, metavar="FILE",
              help="Mapping table (.toml) to use instead of the packaged one that accepts SRC's config.json.")
@click.option("--device", type=DEVICE_CHOICE, default="Ascend", show_default=True, help=DEVICE_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@_clean_errors
def convert(src, out, dtype, fmt, fuse_qkv, tp, revision, mapping, device, overwrite, as_json):
    """Convert the HF checkpoint SRC (folder or hub repo id) into OUT."""
    from .convert import convert as run
    result = run(src, out, dtype=dtype, fmt=fmt, fuse_qkv=fuse_qkv, tp=tp, revision=revision,
                 progress=_progress(as_json), mapping=mapping, overwrite=overwrite, device=device)
    _report(result, as_json)
    _warn(result)


@main.command()
@click.argument("src")
@click.argument("out")
@click.option("--tp", type=int, required=True, help="Number of tensor-parallel ranks to write.")
@click.option("--ranks", default=None, metavar="R0,R1,...",
              help="Write only these ranks (one node's part of a multi-node job; the same bytes as the full run).")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None, help="Output format (default: the source's).")
@click.option("--config", "config", default=None,
              help="HF folder or config.json for a source without a manifest that carries no config.json.")
@click.option("--mapping", default=None, metavar="FILE",
              help="The mapping table, for a source without a manifest, if not the packaged one.")
@click.option("--device", type=DEVICE_CHOICE, default="Ascend", show_default=True, help=DEVICE_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE)
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def shard(src, out, tp, ranks, fmt, config, mapping, device, overwrite, as_json):
    """Re-cut the MindSpore checkpoint SRC, in any layout, into TP tensor-parallel ranks: a convert / shard
    output of any tp, a .ckpt / .safetensors file, or rank_<r>/ folders with strategy file(s) from distributed
    training (tensor parallel, pipeline stages, optimizer-parallel slices). Optimizer state is skipped."""
    from .shard import shard as run
    result = run(src, out, tp=tp, ranks=ranks, fmt=fmt, config=config, mapping=mapping,
                 progress=_progress(as_json), overwrite=overwrite, device=device)
    _report(result, as_json)
    _warn(result)


@main.command()
@click.argument("ms_src")
@click.argument("hf_out")
@click.option("--config", "config", default=None,
              help="HF folder (config, tokenizer, processor files are copied) or config.json; "
                   "default: the files MS_SRC carries.")
@click.option("--dtype", type=DTYPES, default=None,
              help="Cast every tensor (default: the HF source's dtype a convert output records, else as stored).")
@click.option("--max-shard-size", default=DEFAULT_SHARD_SIZE, show_default=True,
              help="Cut files at this size when MS_SRC does not record its HF files (5GB, 500MB, 2GiB, bytes).")
@click.option("--mapping", default=None, metavar="FILE",
              help="The mapping table MS_SRC was converted with, if not the packaged one (convert --mapping).")
@click.option("--overwrite", is_flag=True, help=OVERWRITE)
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def export(ms_src, hf_out, config, dtype, max_shard_size, mapping, overwrite, as_json):
    """Export a MindSpore checkpoint MS_SRC (convert/shard output, .ckpt/.safetensors file, or rank_<r>/ folders
    with a strategy file) to a Hugging Face folder HF_OUT."""
    from .export import export as run
    result = run(ms_src, hf_out, config=config, dtype=dtype, max_shard_size=max_shard_size,
                 progress=_progress(as_json), mapping=mapping, overwrite=overwrite)
    _report(result, as_json)
    _warn(result)


@main.command()
@click.argument("hf_src")
@click.argument("ms_dir")
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="Image file (default: bundled).")
@click.option("--prompt", default=None, help="Question about the image (default: a caption request).")
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Compute dtype: float32 for the tightest comparison; float16 the reference model's activations; "
                   "bfloat16 every Linear's product on both sides (float32 sums; the fast walk: needs AVX-512 "
                   "BF16), with its own tolerance.")
@click.option("--device", type=click.Choice(["CPU", "Ascend", "GPU"]), default="CPU", show_default=True,
              help="MindSpore device target of the reference model.")
@click.option("--msrun/--no-msrun", default=None,
              help="Run a --tp output's rank files as real tensor-parallel ranks under msrun (default for a tp "
                   "output); --no-msrun keeps only the single-process check on the reassembled rank files.")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds one msrun attempt may take before its ranks are ended (it is retried once).")
@click.option("--weights-only", is_flag=True,
              help="Only the weight proof: every tensor, on every rank, back through its op's inverse and compared "
                   "bit for bit with its source cast to its stored dtype (no model is run).")
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def verify(hf_src, ms_dir, image, prompt, max_new_tokens, dtype, device, msrun, timeout, weights_only, as_json):
    """Prove every weight in MS_DIR against HF_SRC bit for bit, then run the converted weights next to
    transformers, layer by layer, and compare."""
    from .verify import verify as run, format_report
    result = run(hf_src, ms_dir, image=image, prompt=prompt, max_new_tokens=max_new_tokens, dtype=dtype,
                 device_target=device, msrun=msrun, timeout=timeout, weights_only=weights_only,
                 progress=_progress(as_json))
    click.echo(json.dumps(result) if as_json else format_report(result))
    sys.exit(0 if result["passed"] else 1)


@main.command()
@click.argument("ms_dir")
@click.option("--image", "images", multiple=True, help="Image file; repeatable, paired in order with --prompt.")
@click.option("--prompt", "prompts", multiple=True, help="Question about the image (repeatable).")
@click.option("--requests", "requests_file", default=None,
              help='JSON lines: {"image": path, "prompt": text} (paths relative to the file\'s folder).')
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Requests per forward pass.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Compute dtype.")
@click.option("--device", type=click.Choice(["CPU", "Ascend", "GPU"]), default="CPU", show_default=True)
@click.option("--raw", is_flag=True, help="TEXT is the whole prompt (must contain <image>); no chat template.")
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for --do-sample (same seed, same tokens).")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds the msrun ranks of a --tp output may take per batch before the run is retried.")
@click.option("--prefill-matmul", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="bfloat16: the prompts' matrix products in bfloat16 with float32 sums (AVX-512 BF16 CPUs), "
                   "faster, not float32's numbers.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
@_clean_errors
def generate(ms_dir, images, prompts, requests_file, max_new_tokens, batch_size, dtype, device, raw, do_sample,
             temperature, top_p, seed, timeout, prefill_matmul, as_json):
    """Answer questions about images with the converted checkpoint in MS_DIR."""
    from .generate import format_outputs, generate as run, pair_requests, read_requests
    if requests_file and (images or prompts):
        raise CheckpointError("give either --requests or --image/--prompt pairs, not both")
    requests = read_requests(requests_file) if requests_file else pair_requests(images, prompts)
    show = _progress(as_json)
    first = [True]

    def on_batch(batch, done, total, stats):
        if not as_json:
            if not first[0]:
                click.echo("")
            first[0] = False
            click.echo(format_outputs(batch))
        if show:
            rate = stats["decode_tokens"] / stats["decode_s"] if stats["decode_s"] else 0.0
            click.echo(f"[generate] {done}/{total} requests, {rate:.1f} tokens/s", err=True)

    result = run(ms_dir, requests, max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype,
                 device=device, raw=raw, do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
                 timeout=timeout, on_batch=on_batch, prefill_matmul=prefill_matmul)
    if as_json:
        click.echo(json.dumps(result))


@main.command()
@click.argument("repo")
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@click.option("--local-dir", type=click.Path(file_okay=False), default=None)
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def download(repo, revision, local_dir, as_json):
    """Fetch what conversion and verification need from the hub, sha256-checked."""
    from .hub import download as run
    _report(run(repo, revision=revision, local_dir=local_dir, progress=_progress(as_json)), as_json)


@main.command()
@click.argument("out")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: ok, checked, problems and the verification record's status.")
@_clean_errors
def check(out, as_json):
    """Re-hash every output file in OUT against its manifest (exit 1 on corruption) and say whether its
    verification record still applies."""
    from .check import check as run, format_verification
    result = run(out)
    if as_json:
        click.echo(json.dumps(result))
    else:
        for line in result["problems"]:
            click.echo(line)
        if result["verification"] is not None:
            click.echo(format_verification(result["verification"]))
        click.echo(f"{'ok' if result['ok'] else 'CORRUPT'}: {result['checked']} files checked in {out}")
    sys.exit(0 if result["ok"] else 1)


@main.command("make-fixture")
@click.argument("out")
@click.option("--preset", type=click.Choice(list(FIXTURE_PRESETS)), default="tiny",
              show_default=True)
@click.option("--dtype", type=DTYPES, default="float16", show_default=True)
@click.option("--layout", type=click.Choice(["hub", "v5", "inmemory"]), default="hub", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_clean_errors
def make_fixture(out, preset, dtype, layout, seed):
    """Write a synthetic HF LLaVA checkpoint (real names, shard split, tokenizer) to OUT: LLaVA-1.5, bakLlava or
    LLaVA-NeXT, by --preset."""
    from .fixture import make_fixture as run
    path = run(out, preset=preset, dtype=dtype, layout=layout, seed=seed)
    click.echo(path)


@main.command()
@click.argument("workdir", required=False)
@_clean_errors
def demo(workdir):
    """Download-free demo: tiny checkpoint -> convert -> shard -> verify -> generate, then list the outputs."""
    from .demo import demo as run
    sys.exit(run(workdir))


def _warn(result: dict) -> None:
    for line in result.get("warnings", []):
        click.echo("warning: " + line, err=True)


def _report(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    for key, value in result.items():
        if isinstance(value, (list, dict)):
            continue
        click.echo(f"{key}: {value}")


if __name__ == "__main__":
    main()

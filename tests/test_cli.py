"""The click layer: click's own usage errors end like every other bad input, in one `error:` line and exit 2
(not click's usage block), naming the help to read; help and a bare call still print the help."""
import pytest
from click.testing import CliRunner

from llava_ckpt.cli import main


@pytest.mark.parametrize("args,message", [
    (["verify", "hf", "ms", "--dtype", "int8"],
     "error: Invalid value for '--dtype': 'int8' is not one of 'float32', 'float16', 'bfloat16'. "
     "(see 'main verify --help')"),
    (["generate", "ms", "--prefill-matmul", "int8"],
     "error: Invalid value for '--prefill-matmul': 'int8' is not one of 'float32', 'bfloat16'. "
     "(see 'main generate --help')"),
    (["convert"], "error: Missing argument 'SRC'. (see 'main convert --help')"),
    (["verify", "hf", "ms", "--bogus"], "error: No such option '--bogus'. (see 'main verify --help')"),
    (["nosuchcommand"], "error: No such command 'nosuchcommand'. (see 'main --help')"),
], ids=["bad-choice", "bad-mode", "missing-argument", "unknown-option", "unknown-command"])
def test_usage_errors_are_one_error_line_and_exit_2(args, message):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [message]


@pytest.mark.parametrize("args,code", [([], 2), (["--help"], 0), (["verify", "-h"], 0)])
def test_help_is_still_click_help(args, code):
    """Asked for (exit 0), or a bare call (click's own exit 2 with the help: nothing was asked)."""
    r = CliRunner().invoke(main, args)
    assert r.output.startswith("Usage: main"), r.output
    assert r.exit_code == code

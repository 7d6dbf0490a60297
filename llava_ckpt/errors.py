"""One exception type for bad input: the CLI turns it into `error: ...` and exit code 2."""


class CheckpointError(Exception):
    """Bad input or an impossible request. The message is one line that names the problem and the file."""


def fail(message: str) -> "CheckpointError":
    """Build the error so call sites read `raise fail(...)`."""
    return CheckpointError(" ".join(str(message).split("\n")))

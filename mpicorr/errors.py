"""The exception types that mean "the user must fix something" (exit status 2, no traceback)."""


class UserError(Exception):
    """A problem with the user's input: the message names the file or option and what to do."""

    exit_status = 2


class SharedError(UserError):
    """A UserError raised on every rank at once (so only rank 0 reports it and all ranks exit cleanly)."""


class Terminated(Exception):
    """SIGTERM while counting (a scheduler's notice before it kills the job): this rank saved a checkpoint;
    the job ends with status 143 (128 + SIGTERM) and --resume continues it."""

    exit_status = 143

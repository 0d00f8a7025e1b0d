"""The one exception type that means "the user must fix something" (exit status 2, no traceback)."""


class UserError(Exception):
    """A problem with the user's input: the message names the file or option and what to do."""

    exit_status = 2

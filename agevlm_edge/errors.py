"""Errors the CLI turns into one clear line on stderr.

``BadInput`` means the user can fix it (exit 2); ``CheckFailed`` means a quality or parity
check ran and failed (exit 1). Library code raises them; only ``cli.py`` decides exit codes.
"""


class AgevlmError(Exception):
    exit_code = 2


class BadInput(AgevlmError):
    """Bad input or usage: the message says what is wrong and how to fix it."""

    exit_code = 2


class CheckFailed(AgevlmError):
    """A check ran to completion and failed (drift over budget, parity failed)."""

    exit_code = 1

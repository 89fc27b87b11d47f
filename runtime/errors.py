"""Base class of the errors a user can act on: CLIs print them as one line (no traceback) and exit 2."""


class UserError(Exception):
    pass


class NonFiniteLossError(UserError):
    """Training stopped before an update that a NaN/Inf loss would have made (exit 3, not 2)."""


class ConfigError(UserError, ValueError):
    """A configuration problem, with a message meant for the person who typed the command."""

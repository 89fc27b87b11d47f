"""Base class of the errors a user can act on: CLIs print them as one line (no traceback) and exit 2."""


class UserError(Exception):
    pass

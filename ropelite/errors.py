"""The one exception type that users see as a single line (scripts print it and exit non-zero)."""


class RopeliteError(ValueError):
    """Bad input from the user: a path, a flag, a file. The message names the problem."""

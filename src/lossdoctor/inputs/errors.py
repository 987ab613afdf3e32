"""The one exception type for bad input."""


class InputError(ValueError):
    """Bad input. The message is one line: what is wrong, and how to fix it."""

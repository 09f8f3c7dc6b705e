"""Errors a user can cause (config, paths, data).

The CLI prints these as one line on stderr and exits with code 2; anything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input: a config value, a path, a data set."""


class ConfigError(UserError):
    """A bad configuration key or value; the message names the key."""


def is_whole(value: object, minimum: int) -> bool:
    """An ``int`` (not a ``bool``, not a float that happens to be whole) of at least ``minimum``:
    the shared test behind the library's integer arguments (batch sizes, counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

"""Errors a user can cause (config, paths, data).

The CLI prints these as one line on stderr and exits with code 2; anything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input: a config value, a path, a data set."""


def one_line(error: UserError) -> str:
    """The error's message as one line. A DataLoader worker's UserError reaches the main process
    re-made with the worker's traceback in its message ("Caught UserError in DataLoader worker
    process 0. Original Traceback ..."): its last line, the original message, is the one."""
    text = str(error)
    if "\nOriginal Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(f"{__name__}.") and ": " in last else last
    return text


class ConfigError(UserError):
    """A bad configuration key or value; the message names the key."""


def is_whole(value: object, minimum: int) -> bool:
    """An ``int`` (not a ``bool``, not a float that happens to be whole) of at least ``minimum``:
    the shared test behind the library's integer arguments (batch sizes, counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

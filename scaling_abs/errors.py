"""Errors a user can cause (config, paths, data).

The CLI prints these as one line on stderr and exits with code 2; anything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input: a config value, a path, a data set."""


class ConfigError(UserError):
    """A bad configuration key or value; the message names the key."""

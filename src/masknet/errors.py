"""Errors a user can cause (bad config, bad file, bad value).

The CLI turns a `UserError` into a one-line message and exit code 2; anything
else is a bug in masknet and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message names the file, line, field or key."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type, or is out of range."""


class DataError(UserError):
    """An input file is missing, empty or malformed."""

"""The one exception type for bad input anywhere in the project.

Anything a user can get wrong (a config value, a file, a genotype) raises `ConfigError` with a
message that names the key, file or value and what to do. The launcher turns it into one
line on stderr and exit status 2; everything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """Invalid user input: a config key, a file or a value, named in the message."""


class NonFiniteLossError(RuntimeError):
    """A loss or metric became NaN or infinite; the message names which and at what step."""

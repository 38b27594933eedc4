"""The exceptions jaxrlhf raises on bad input: each message says what is wrong and where."""


class JaxRLHFError(Exception):
    """Base class: catch this to handle every jaxrlhf input error at once."""


class ConfigError(JaxRLHFError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class CheckpointError(JaxRLHFError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


class OutputError(JaxRLHFError):
    """An output would replace or overlap what it must not (a user's files, a run's inputs),
    or could not be written (disk full, read-only, permissions)."""


def first_line(error: BaseException) -> str:
    """The root cause of an error, in one line: for a one-line message from an error whose own
    text may span several (a library's, a user's function's)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]

"""The two kinds of user mistake, each reported by train.py as one `error:` line (exit status 2, no traceback).

Every other module raises these; none defines its own error types. Keep messages to one line that names the key
or file (and row) and says how to fix it.
"""


class ConfigError(ValueError):
    """A mistake in the composed config: a key's value, a combination of keys, a path that a key names."""


class DataError(ValueError):
    """A mistake in the data a run reads: a missing file, unknown columns, a malformed row (with its number)."""

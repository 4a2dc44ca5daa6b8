"""The project's user errors: bad input (a flag, a file, a value), as opposed to bugs.

An entry point reports a `UserError` as one `error: <message>` line and a non-zero exit, from one
rank (`megatron_lite.cli.run_main`); any other exception is a bug and keeps its traceback. Each
module raises its own subclass (ConfigError, CheckpointError, TokenizerError, DataError, ...), so
callers can still catch the narrow kind. Standard library only: config/ imports this.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input; the message names the flag, file (and line) or value, and what to do."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or directory named by a flag does not exist."""


class DataError(UserError, ValueError):
    """A dataset, index cache or corpus that cannot be used (empty, corrupt, ids past the vocab)."""


class TokenizerError(UserError, ValueError):
    """Tokenizer files or flags that cannot give a working tokenizer."""

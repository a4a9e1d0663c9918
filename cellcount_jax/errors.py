"""The error a user can act on: a bad file, shape, annotation or config value.

`InputError` is a `ValueError` whose message names the file or config key and says what was
expected. The `cellcount` command prints it as one line, `error: <message>`, and exits with
status 2 (a traceback only with `--verbose`); any other exception is a bug and keeps its
traceback.
"""


class InputError(ValueError):
    """A problem with the user's input, described in its message."""

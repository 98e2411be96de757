"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a UserError into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback (with --debug) or is summarised (without).
"""


class UserError(Exception):
    """A mistake in the user's input: bad option, missing folder, unusable data."""

"""The one exception type for mistakes a user can fix (bad data, bad config, missing files).

The CLI prints these as a single message and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message says what, where, and what to do."""

"""The one exception type for mistakes a user can fix (bad data, bad config, missing files).

The CLI prints these as a single message and exits non-zero; anything else is a bug and keeps
its traceback.

A message names the setting a user can change with :func:`option` (``option("skip_bad")``), not
with one command's flag: each command renders it in its own words (``sa2va-rl check-data``:
``--skip-bad``; ``sa2va-rl run``: ``data.skip_bad: true``), see :meth:`UserError.in_words`.
``str(error)`` uses :data:`DEFAULT_WORDS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

DEFAULT_WORDS = {
    "skip_bad": "--skip-bad (skip_bad=True)",
    "format": "--format",
    "group_pattern": "--group-pattern",
    "model": "--model",
    "cpu_backend": "--model frangi",
    "margin_gb": "--margin-gb",
    "model_gb": "--model-gb",
    "inventory": "--inventory",
}
"""How a setting is named when no command says otherwise (the flags of check-data and plan)."""
_MARK = re.compile(r"\[\[option:([a-z_]+)\]\]")


def option(name: str) -> str:
    """A placeholder for the setting ``name`` (a key of :data:`DEFAULT_WORDS`) in a message."""
    if name not in DEFAULT_WORDS:
        raise KeyError(f"unknown option {name!r}; known: {', '.join(DEFAULT_WORDS)}")
    return f"[[option:{name}]]"


class UserError(Exception):
    """A problem with the user's input: the message says what, where, and what to do."""

    def in_words(self, words: Mapping[str, str]) -> str:
        """The message with every :func:`option` named as ``words`` says (else by default)."""
        text = super().__str__()
        return _MARK.sub(lambda m: words.get(m[1], DEFAULT_WORDS[m[1]]), text)

    def __str__(self) -> str:
        return self.in_words({})

"""Errors name settings in the words of the command the user ran."""

from __future__ import annotations

import pytest

from models.errors import DEFAULT_WORDS, UserError, option
from orchestrator.commands.words import CONFIG_WORDS


def test_a_setting_is_named_by_default_as_the_flag_and_per_command_as_asked() -> None:
    err = UserError(f"bad entries. Fix them or pass {option('skip_bad')}; or {option('format')}")
    assert str(err) == "bad entries. Fix them or pass --skip-bad (skip_bad=True); or --format"
    assert err.in_words(CONFIG_WORDS) == (
        "bad entries. Fix them or pass data.skip_bad: true in the --config file; "
        "or data.format in the --config file"
    )


def test_every_setting_has_config_words_and_unknown_ones_are_refused() -> None:
    assert set(CONFIG_WORDS) == set(DEFAULT_WORDS)
    with pytest.raises(KeyError, match="unknown option 'nope'"):
        option("nope")

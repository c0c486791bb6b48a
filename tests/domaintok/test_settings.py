"""domaintok.settings: every DOMAINTOK_* setting read in one place, typed, overridable by options, handed on to child
processes exactly."""

from __future__ import annotations

import pytest

from domaintok.errors import DomaintokError
from domaintok.settings import Settings


def test_defaults_types_and_empty_variables():
    got = Settings.from_env({"DOMAINTOK_BATCH_SIZE": "128", "DOMAINTOK_BATCH_WITHIN": "0.05",
                             "DOMAINTOK_MAX_LENGTH": "", "DOMAINTOK_CONSUMER": " Faust ", "UNRELATED": "x"})
    assert got.batch_size == 128 and got.batch_within == 0.05 and got.max_length is None and got.consumer == "faust"
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(("name", "value", "message"), [
    ("DOMAINTOK_BATCH_SIZE", "many", "DOMAINTOK_BATCH_SIZE='many': not a valid int"),
    ("DOMAINTOK_COMMIT_INTERVAL", "2s", "DOMAINTOK_COMMIT_INTERVAL='2s': not a valid float"),
    ("DOMAINTOK_CONSUMER", "kafka", "DOMAINTOK_CONSUMER='kafka' is not one of batch, faust"),
])
def test_a_bad_value_is_one_line_naming_the_variable(name, value, message):
    with pytest.raises(DomaintokError) as err:
        Settings.from_env({name: value})
    assert str(err.value) == message


def test_options_override_and_child_environment_round_trips():
    parent = Settings.from_env({"DOMAINTOK_BATCH_SIZE": "100", "DOMAINTOK_APP_ID": "a"})
    given = parent.override(batch_size=4000, app_id=None, max_length=64)  # None: the option was not given
    assert (given.batch_size, given.app_id, given.max_length) == (4000, "a", 64)
    child = Settings.from_env({"DOMAINTOK_BATCH_SIZE": "100", **given.to_env()})  # the parent's value is overwritten
    assert child == given

"""``--http-lean on|off`` and ``[http] lean``: parsed, flags win, a bad value is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from unisondb.config import load_config
from unisondb.errors import InvalidRequest


def test_on_by_default_and_the_flag_turns_it_off() -> None:
    assert load_config().http.lean is True
    assert load_config(http_overrides={"lean": "off"}).http.lean is False
    assert load_config(http_overrides={"lean": "on"}).http.lean is True


def test_the_toml_key_is_a_boolean_and_the_flag_wins(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("[http]\nlean = false\n")
    assert load_config(config).http.lean is False
    assert load_config(config, http_overrides={"lean": "on"}).http.lean is True


@pytest.mark.parametrize("value", ["yes", "1", 1, ""])
def test_anything_else_is_refused_with_what_to_write(tmp_path: Path, value: object) -> None:
    with pytest.raises(InvalidRequest, match="invalid http lean .*expected on or off"):
        load_config(http_overrides={"lean": value})

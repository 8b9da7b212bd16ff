"""`echelon.tomlconfig.build`: every refusal names the key, the value and what was wanted."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from echelon.tomlconfig import ConfigFileError, build, dumps, load_toml


@dataclass(frozen=True, kw_only=True)
class Inner:
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"Inner.size: got {self.size}, want >= 1")


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str
    ratio: float = 0.5
    on: bool = False
    where: Path = Path("here")
    inner: Inner = field(default_factory=Inner)


def _refusal(table: dict[str, object]) -> ConfigFileError:
    with pytest.raises(ConfigFileError) as caught:
        build(Outer, table, "outer")
    return caught.value


@pytest.mark.parametrize(
    ("table", "message", "key"),
    [
        (
            {"name": "a", "nmae": "b"},
            "[outer].nmae = 'b': unknown key; want one of inner, name, on, ratio, where",
            "outer.nmae",
        ),
        ({}, "[outer].name: missing, a required key", "outer.name"),
        ({"name": 3}, "[outer].name: got 3, want a string", "outer.name"),
        ({"name": "a", "ratio": "x"}, "[outer].ratio: got 'x', want a number", "outer.ratio"),
        ({"name": "a", "on": 1}, "[outer].on: got 1, want true or false", "outer.on"),
        (
            {"name": "a", "where": 5},
            "[outer].where: got 5, want a path (a string)",
            "outer.where",
        ),
        (
            {"name": "a", "inner": {"size": True}},
            "[outer.inner].size: got True, want an integer",
            "outer.inner.size",
        ),
        ({"name": "a", "inner": 3}, "[outer].inner: got 3, want a table", "outer.inner"),
    ],
)
def test_refusals_name_key_value_and_want(table: dict[str, object], message: str, key: str) -> None:
    error = _refusal(table)
    assert (str(error), error.key) == (message, key)


def test_a_check_of_the_dataclass_is_prefixed_with_its_table() -> None:
    error = _refusal({"name": "a", "inner": {"size": 0}})
    assert str(error) == "[outer.inner]: Inner.size: got 0, want >= 1"


def test_values_are_coerced_and_built_tables_pass_through() -> None:
    built = build(Outer, {"name": "a", "ratio": 1, "where": "d/e", "inner": Inner(size=4)}, "o")
    assert built == Outer(name="a", ratio=1.0, where=Path("d/e"), inner=Inner(size=4))
    assert isinstance(built.ratio, float)


def test_dumps_round_trips_through_load_toml(tmp_path: Path) -> None:
    tables = {"service": {"port": 0, "host": "::1", "on": True, "files": ["a", "b"]}}
    path = tmp_path / "c.toml"
    path.write_text(dumps(tables))
    assert load_toml(path) == tables


def test_a_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[service\n")
    with pytest.raises(ConfigFileError, match=r"bad\.toml: "):
        load_toml(path)

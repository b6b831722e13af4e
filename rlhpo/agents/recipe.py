"""Agent recipes: a settings dataclass per agent, filled from ``rlhpo/recipes/<agent>.toml``
and ``key=value`` overrides from the command line."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import tomllib

T = TypeVar("T")


def recipes_dir() -> Path:
    """The shipped recipes, inside the package (``RLHPO_AGENTS_DIR`` overrides it)."""
    from rlhpo.shipped import recipes_dir as shipped_recipes

    return shipped_recipes()


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` with a TOML value (``lr=3e-4``, ``freeze=["dropout"]``); a bare
    word that is not TOML is taken as a string (``vec_env=subproc``)."""
    if "=" not in text:
        raise ValueError(f"--set takes key=value, got {text!r}")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key:
        raise ValueError(f"--set takes key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def build_settings(cls: type[T], values: dict[str, Any]) -> T:
    """``cls(**values)`` with a clear error for unknown keys and wrongly typed values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} setting(s) {unknown}; known: {', '.join(sorted(fields))}"
        )
    clean: dict[str, Any] = {}
    for k, v in values.items():
        default = fields[k].default
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ValueError(f"{k} must be true or false, got {v!r}")
        elif isinstance(default, int) and not isinstance(default, bool):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{k} must be an integer, got {v!r}")
        elif isinstance(default, float):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"{k} must be a number, got {v!r}")
            v = float(v)
        elif isinstance(default, str) and not isinstance(v, str):
            raise ValueError(f"{k} must be a string, got {v!r}")
        elif isinstance(default, tuple):
            if not isinstance(v, (list, tuple)):
                raise ValueError(f"{k} must be a list, got {v!r}")
            v = tuple(v)
        clean[k] = v
    return cls(**clean)


def load_recipe(
    cls: type[T], agent: str, path: str | os.PathLike[str] | None = None, overrides: list[str] = ()
) -> T:
    """Settings for ``agent``: dataclass defaults, then the recipe TOML, then overrides."""
    values: dict[str, Any] = {}
    p = Path(path) if path else recipes_dir() / f"{agent}.toml"
    if path or p.is_file():
        if not p.is_file():
            raise ValueError(f"recipe {p} does not exist")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"recipe {p} is not valid TOML ({e})") from e
        found = raw.pop("agent", agent)
        if found != agent:
            raise ValueError(f"recipe {p} is for agent {found!r}, not {agent!r}")
        values.update(raw)
    for text in overrides:
        k, v = parse_override(text)
        values[k] = v
    return build_settings(cls, values)


def settings_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as a JSON-able dict (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()
    }

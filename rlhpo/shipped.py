"""Data that ships inside the package, found through :mod:`importlib.resources` so that a
wheel install works the same as a checkout:

- ``rlhpo/suites/*.toml``: task suites, by name (``default``, ``tiny``);
- ``rlhpo/recipes/*.toml``: agent recipes (``ppo``, ``reinforce``);
- ``rlhpo/baselines/calibrated/*.json``: baseline settings tuned on a train split;
- ``rlhpo/policies/NAME/``: released policies, by name (``default``, ``reinforce``).

The environment variables ``RLHPO_ENVS`` (suites), ``RLHPO_AGENTS_DIR`` (recipes) and
``RLHPO_BASELINES`` (calibrated baselines) point a folder elsewhere.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from importlib import resources
from pathlib import Path

_EXTRACTED = contextlib.ExitStack()
atexit.register(_EXTRACTED.close)


def package_path(*parts: str) -> Path:
    """A file or folder inside the installed ``rlhpo`` package, as a file-system path.

    Installed from a wheel or a checkout this is the file itself; from a zip import it is
    extracted once and removed at exit.
    """
    item = resources.files("rlhpo").joinpath(*parts)
    if isinstance(item, Path):
        return item
    return Path(_EXTRACTED.enter_context(resources.as_file(item)))


def _folder(env: str, *parts: str) -> Path:
    override = os.environ.get(env)
    return Path(override) if override else package_path(*parts)


def suites_dir() -> Path:
    """Folder of the shipped suites (``RLHPO_ENVS`` overrides it)."""
    return _folder("RLHPO_ENVS", "suites")


def recipes_dir() -> Path:
    """Folder of the agent recipes (``RLHPO_AGENTS_DIR`` overrides it)."""
    return _folder("RLHPO_AGENTS_DIR", "recipes")


def calibrated_dir() -> Path:
    """Folder of the calibrated baseline settings (``RLHPO_BASELINES`` overrides it)."""
    return _folder("RLHPO_BASELINES", "baselines", "calibrated")


def policies_dir() -> Path:
    """Folder of the released policies, one sub-folder per name."""
    return package_path("policies")


def suite_names() -> list[str]:
    """Names of the shipped suites."""
    return sorted(p.stem for p in suites_dir().glob("*.toml"))


def policy_names() -> list[str]:
    """Names of the shipped policies."""
    return sorted(p.name for p in policies_dir().iterdir() if (p / "manifest.json").is_file())


def policy_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A policy directory from a path or a shipped policy's name (``default``).

    A path that exists wins, so ``./default`` always means the local folder; anything
    else that names a shipped policy means that one. Otherwise the path is returned
    as given, for the loader to report what is missing.
    """
    p = Path(name_or_path)
    if p.exists():
        return p
    text = str(name_or_path)
    if text and os.sep not in text and "/" not in text and text not in (".", ".."):
        shipped = policies_dir() / text
        if (shipped / "manifest.json").is_file():
            return shipped
    return p


__all__ = [
    "calibrated_dir",
    "package_path",
    "policies_dir",
    "policy_names",
    "policy_path",
    "recipes_dir",
    "suite_names",
    "suites_dir",
]

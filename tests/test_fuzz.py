"""Property-based tests over what users and other programs hand rlhpo: suite files,
policy manifests and command lines. Whatever the input: only rlhpo's own error
types (or exit status 2 on the command line), no hang, and nothing already written
is lost. Settings: the ``dev`` and ``ci`` profiles in conftest.py."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tomllib
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from rlhpo.cli import app
from rlhpo.policy import Policy, PolicyFileError, PolicyNet, load_policy, save_policy
from rlhpo.tasks import SpecError, Suite, load_suite

TINY = Path(__file__).resolve().parents[1] / "rlhpo" / "suites" / "tiny.toml"
_names = itertools.count()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        items = (f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None)
        return "{ " + ", ".join(items) + " }"
    return '""'  # TOML has no null


def _toml(doc: dict) -> str:
    """A TOML document (no writer ships with the standard library)."""
    tasks = doc.get("tasks")
    nested = isinstance(tasks, dict)
    top = [
        f"{json.dumps(k)} = {_toml_value(v)}" for k, v in doc.items() if k != "tasks" or not nested
    ]
    for name, task in (tasks if nested else {}).items():
        if isinstance(task, dict):
            top.append(f"[tasks.{json.dumps(name)}]")
            top += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in task.items()]
        else:
            top.append(f"tasks.{json.dumps(name)} = {_toml_value(task)}")
    return "\n".join(top) + "\n"


def _paths(doc, prefix=()):
    """Every key path in a nested dict."""
    for k, v in doc.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))


TINY_DOC = tomllib.loads(TINY.read_text())
TINY_PATHS = list(_paths(TINY_DOC))


def _load(tmp_path: Path, text: str):
    p = tmp_path / f"suite{next(_names)}.toml"  # a new name: load_suite caches by path
    p.write_text(text)
    try:
        return load_suite(p)
    except SpecError:
        return None


@given(text=st.text(max_size=300))
def test_any_text_as_a_suite_is_a_suite_or_a_spec_error(tmp_path_factory, text):
    _load(tmp_path_factory.mktemp("s"), text)


@given(edits=st.lists(st.tuples(st.sampled_from(TINY_PATHS), json_values), min_size=1, max_size=3))
def test_a_mutated_suite_is_a_suite_or_a_spec_error(tmp_path_factory, edits):
    doc = copy.deepcopy(TINY_DOC)
    for path, value in edits:
        node = doc
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[path[-1]] = value
    suite = _load(tmp_path_factory.mktemp("s"), _toml(doc))
    if suite is not None:
        assert isinstance(suite, Suite) and suite.split("all")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return save_policy(tmp_path_factory.mktemp("p") / "pol", PolicyNet(), suite="tiny")


MANIFEST = None


def _manifest(policy_dir: Path) -> dict:
    global MANIFEST
    if MANIFEST is None:
        MANIFEST = json.loads((policy_dir / "manifest.json").read_text())
    return copy.deepcopy(MANIFEST)


def _check_policy(path: Path) -> None:
    try:
        pol = load_policy(path)
    except PolicyFileError as e:
        assert "\n" not in str(e).strip() or "safetensors" in str(e)
        return
    assert isinstance(pol, Policy)
    assert all(isinstance(k, str) for k in pol.freeze)
    pol.act(np.zeros(16, dtype=np.float32))


@given(data=st.data())
def test_a_mutated_manifest_loads_or_is_a_policy_file_error(policy_dir, tmp_path_factory, data):
    m = _manifest(policy_dir)
    paths = list(_paths(m))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = m
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[path[-1]] = data.draw(json_values)
    if data.draw(st.booleans()):
        m[data.draw(st.text(max_size=6))] = data.draw(json_values)
    out = tmp_path_factory.mktemp("m")
    (out / "manifest.json").write_text(json.dumps(m))
    (out / "policy.safetensors").write_bytes((policy_dir / "policy.safetensors").read_bytes())
    _check_policy(out)


@given(raw=st.binary(max_size=400))
def test_any_bytes_as_a_manifest_is_a_policy_file_error(policy_dir, tmp_path_factory, raw):
    out = tmp_path_factory.mktemp("b")
    (out / "manifest.json").write_bytes(raw)
    (out / "policy.safetensors").write_bytes((policy_dir / "policy.safetensors").read_bytes())
    with pytest.raises(PolicyFileError):
        load_policy(out)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """An output folder holding files a bad command must leave alone."""
    out = tmp_path_factory.mktemp("done") / "cmp"
    out.mkdir()
    files = {"results.csv": "method,task\nstatic,bc-mlp\n", "compare.json": "{}\n"}
    for name, text in files.items():
        (out / name).write_text(text)
    return out, files


args_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30
)


@given(
    methods=args_text,
    seeds=args_text,
    starts=args_text,
    tasks=args_text,
    scale=args_text,
    reps=args_text,
    split=args_text,
)
def test_compare_arguments_never_give_a_traceback(
    written, methods, seeds, starts, tasks, scale, reps, split
):
    out, files = written
    args = ["compare", "--out", str(out), "--suite", str(TINY), "--methods", methods]
    args += ["--seeds", seeds, "--starts", starts, "--tasks", tasks, "--split", split]
    args += ["--budget-scale", scale, "--bootstrap-reps", reps, "--no-wandb"]
    # --workers 0 is refused after every other argument was parsed, so no run starts.
    r = CliRunner().invoke(app, [*args, "--workers", "0"])
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    for name, text in files.items():
        assert (out / name).read_text() == text


@given(text=st.text(max_size=300), split=st.sampled_from(["train", "test", "all", "bogus"]))
def test_tasks_command_on_any_suite_text(tmp_path_factory, text, split):
    p = tmp_path_factory.mktemp("t") / "suite.toml"
    p.write_text(text)
    r = CliRunner().invoke(app, ["tasks", "--suite", str(p), "--split", split])
    assert r.exit_code in (0, 2) and r.exception is None or isinstance(r.exception, SystemExit)
    if r.exit_code == 2:
        assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1

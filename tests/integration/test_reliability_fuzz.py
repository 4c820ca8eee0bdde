"""Fuzzing (hypothesis) of the two readers of user files (issue 7).

- The recipe loader (`bulba.config.recipe_from_dict`, `load_recipe`, dotted overrides): any YAML
  tree, YAML text or override string gives a valid `Recipe` or a one-line `UserError`, never
  another exception.
- The token-file reader (`bulba.data.loader.open_data` + `Batches`, Rust engine behind it): random and
  corrupted `.bin`/`.idx`/`meta.json` give valid batches or a `UserError`. It runs in a child
  process (tests/support/fuzz_loader.py), so a segfault or abort in the native code fails this test
  instead of killing pytest.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulba.config import Recipe, load_recipe, recipe_from_dict  # noqa: E402
from bulba.errors import UserError  # noqa: E402
from support.paths import REPO

SECTIONS = {f.name: f for f in dataclasses.fields(Recipe)}
KEYS = {
    "": [f.name for f in dataclasses.fields(Recipe)],
    **{
        name: [f.name for f in dataclasses.fields(f.default_factory())]  # type: ignore[misc]
        for name, f in SECTIONS.items()
        if f.default_factory is not dataclasses.MISSING
    },
}
DOTTED = [k for k in KEYS[""] if k not in KEYS] + [f"{s}.{k}" for s in KEYS if s for k in KEYS[s]]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "auto",
            "eager",
            "compile",
            "stream",
            "packed",
            "bucketed",
            "never",
            "skip",
            "stop",
            "3e-4",
            "1e999",
            "-1",
            "0",
            "[]",
            "{}",
            "cpu",
            "bf16-mixed",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _section(name):
    keys = st.sampled_from(KEYS[name]) | st.text(max_size=10)
    return st.dictionaries(keys, values, max_size=6)


trees = st.dictionaries(
    st.sampled_from(KEYS[""]) | st.text(max_size=8) | st.integers(),
    st.one_of(values, *(_section(s) for s in KEYS if s)),
    max_size=8,
)
overrides = st.lists(
    st.one_of(
        st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(DOTTED) | st.text(max_size=16),
            st.text(max_size=16)
            | scalars.map(lambda x: yaml.safe_dump(x, default_flow_style=True).strip().removesuffix("...").strip()),
        ),
        st.text(max_size=24),
    ),
    max_size=4,
)


def _check(call):
    try:
        r = call()
    except UserError as e:
        assert "\n" not in " ".join(str(e).split()), str(e)  # run_cli prints it on one line
        return None
    assert isinstance(r, Recipe)
    r.validate()  # what train.py relies on
    assert r.model.n_layer > 0 and r.train.batch_size > 0 and math.isfinite(r.train.lr)
    return r


FUZZ = settings(
    max_examples=int(os.environ.get("BULBA_FUZZ_EXAMPLES", "250")),
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@FUZZ
@given(tree=trees, ovs=overrides)
def test_recipe_from_dict_fuzz(tree, ovs):
    _check(lambda: recipe_from_dict(tree, ovs))


@FUZZ
@given(ovs=overrides)
def test_overrides_on_every_preset_fuzz(ovs):
    for preset in ("tiny", "krolik"):
        _check(lambda: load_recipe(preset, ovs))


@FUZZ
@given(
    text=st.text(max_size=300)
    | trees.map(lambda t: yaml.safe_dump(t, allow_unicode=True))
    | st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
)
def test_load_recipe_yaml_text_fuzz(text, tmp_path_factory):
    p = tmp_path_factory.mktemp("fz") / "r.yaml"
    p.write_text(text, encoding="utf-8")
    _check(lambda: load_recipe(str(p)))


def test_load_recipe_bad_bytes_and_yaml_tags(tmp_path):
    cases = {
        "bin.yaml": b"\x80\x81\xfe\xff" * 10,
        "tag.yaml": b"model: !!python/object/apply:os.system ['touch pwned']\n",
        "alias.yaml": b"a: &a [*a]\n",
        "bomb.yaml": b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
        "list.yaml": b"- 1\n- 2\n",
        "deep.yaml": b"model: " + b"[" * 500 + b"]" * 500 + b"\n",
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(UserError):
            load_recipe(str(p))
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()


# --------------------------------------------------------------------------- token files


@pytest.mark.parametrize("what", ["bytes", "meta"])
def test_token_file_reader_fuzz_in_child_process(what, tmp_path):
    n = os.environ.get("BULBA_FUZZ_EXAMPLES", "150")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "support.fuzz_loader", what, n, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, (
        f"child exited {r.returncode} (negative: killed by a signal)\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    )
    assert "fuzz ok" in r.stdout


@pytest.mark.parametrize(
    "key,value",
    [
        pytest.param("splits", [1], id="splits-list"),
        pytest.param("splits", {"train": [1], "val": {}}, id="split-entry-list"),
        pytest.param("splits", {"train": {"tokens": "12"}, "val": {}}, id="tokens-str"),
        pytest.param("splits", {"train": {"tokens": -1}, "val": {}}, id="tokens-negative"),
        pytest.param("splits", {"train": {"tokens": 1.5}, "val": {}}, id="tokens-float"),
        pytest.param("splits", {"train": {"tokens": 2**70}, "val": {}}, id="tokens-huge"),
        pytest.param("dtype", ["uint16"], id="dtype-list"),
        pytest.param("pad_id", -1, id="pad-negative"),
        pytest.param("pad_id", 2**40, id="pad-huge"),
    ],
)
def test_meta_json_wrong_types_are_user_errors(tmp_path, key, value):
    """Minimal cases the meta.json fuzz found (a hand-edited or foreign meta.json)."""
    import json

    from bulba.data.format import open_data
    from bulba.data.loader import Batches
    from support.token_files import make_docs, write_dataset

    d = write_dataset(tmp_path / "d", make_docs([5, 9, 17, 33, 64] * 6, vocab_size=500), vocab_size=500)
    meta = json.loads((d / "meta.json").read_text())
    meta[key] = value
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError):
        next(iter(Batches(open_data(d), split="train", ctx=16, batch_size=2)))

"""Bad input to prepare.py: one line on stderr, exit code 2, no traceback, nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli import assert_one_line_exit_2
from support.paths import REPO

GOOD = "Зубр жыве ў пушчы.\nThe stork builds a nest.\nАист вьёт гнездо.\n"


def run(args, cwd: Path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(REPO / "prepare.py"), *map(str, args), "--no-mlflow"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_nothing_left(parent: Path, out_name: str = "out"):
    assert not (parent / out_name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture
def good(tmp_path) -> Path:
    p = tmp_path / "good.txt"
    p.write_text(GOOD, encoding="utf-8")
    return p


def test_missing_path(tmp_path):
    r = run([tmp_path / "nope.txt", "--out", tmp_path / "out"], tmp_path)
    assert_one_line_exit_2(r, "input not found", "nope.txt")
    assert_nothing_left(tmp_path)


def test_missing_glob(tmp_path):
    r = run([str(tmp_path / "*.jsonl"), "--out", tmp_path / "out"], tmp_path)
    assert_one_line_exit_2(r, "no file matches")
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n"])
def test_empty_corpus(tmp_path, content):
    (tmp_path / "empty.txt").write_bytes(content)
    r = run([tmp_path / "empty.txt", "--out", tmp_path / "out"], tmp_path)
    assert_one_line_exit_2(r, "empty corpus")
    assert_nothing_left(tmp_path)


def test_empty_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "picture.png").write_bytes(b"\x89PNG")
    r = run([tmp_path / "d", "--out", tmp_path / "out"], tmp_path)
    assert_one_line_exit_2(r, "empty corpus")
    assert_nothing_left(tmp_path)


def test_binary_file(tmp_path, good):
    (tmp_path / "blob.txt").write_bytes(b"text first\n" + b"\x00\x01\x02" * 10)
    r = run([good, tmp_path / "blob.txt", "--out", tmp_path / "out"], tmp_path)
    assert_one_line_exit_2(r, "blob.txt", "binary", "byte offset 11")
    assert_nothing_left(tmp_path)


def test_not_utf8(tmp_path, good):
    (tmp_path / "latin1.txt").write_bytes("Зубр\n".encode() + "café".encode("latin-1"))
    r = run([good, tmp_path / "latin1.txt", "--out", tmp_path / "out"], tmp_path)
    assert_one_line_exit_2(r, "latin1.txt", "UTF-8", "byte offset 12")
    assert_nothing_left(tmp_path)


def test_jsonl_without_text_field(tmp_path, good):
    p = tmp_path / "recs.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"body": "wrong field"}) + "\n")
    r = run([good, p, "--out", tmp_path / "out"], tmp_path)
    assert_one_line_exit_2(r, "recs.jsonl:3", "'text'", "--text-field")
    assert_nothing_left(tmp_path)


def test_json_list_without_field(tmp_path, good):
    p = tmp_path / "items.json"
    p.write_text(json.dumps([{"content": "x"}]))
    r = run([good, p, "--out", tmp_path / "out", "--text-field", "body"], tmp_path)
    assert_one_line_exit_2(r, "items.json", "item 0", "'body'")
    assert_nothing_left(tmp_path)


def test_vocab_too_small(tmp_path, good):
    r = run([good, "--out", tmp_path / "out", "--vocab-size", "260"], tmp_path)
    assert_one_line_exit_2(r, "--vocab-size 260", "261")
    assert_nothing_left(tmp_path)


def test_unwritable_output(tmp_path, good):
    (tmp_path / "afile").write_text("x")
    r = run([good, "--out", tmp_path / "afile" / "out"], tmp_path)
    assert_one_line_exit_2(r, "cannot write")
    assert (tmp_path / "afile").read_text() == "x"


def test_existing_dataset_needs_force(tmp_path, good):
    out = tmp_path / "out"
    r = run([good, "--out", out, "--vocab-size", "300", "-q"], tmp_path)
    assert r.returncode == 0, r.stderr
    before = (out / "meta.json").read_bytes()
    r = run([good, "--out", out, "--vocab-size", "300"], tmp_path)
    assert_one_line_exit_2(r, "already holds a dataset", "--force")
    assert (out / "meta.json").read_bytes() == before
    r = run([good, "--out", out, "--vocab-size", "400", "--force", "-q"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 400
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

"""Security (issue 7): weights only through safetensors, no pickle, no eval/exec/yaml.load on
user input, names from recipes and metadata cannot write outside their folders, and the
documented `mlflow server` binds to 127.0.0.1 with a note on authentication.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bulba.errors import UserError  # noqa: E402
from support.paths import REPO

# --------------------------------------------------------------------------- static: no unsafe loaders


def _production_files() -> list[Path]:
    files = sorted((REPO / "bulba").rglob("*.py")) + sorted(REPO.glob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    return [f for f in files if "tests" not in f.parts]


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Calls that can run code from data: eval/exec, yaml.load & co, pickle/marshal/shelve/dill,
    torch.load without weights_only=True, numpy.load(allow_pickle=True), shell=True."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> module.attr for `from x import y [as z]` / `import x as y`
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = aliases.get(head, head) + (f".{rest}" if rest else "")
        where = f"{filename}:{node.lineno}: {name}("
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec") and full == node.func.id:
            bad.append(where)
        elif full in (
            "yaml.load",
            "yaml.unsafe_load",
            "yaml.full_load",
            "yaml.load_all",
            "yaml.unsafe_load_all",
            "yaml.full_load_all",
        ) and not (
            full == "yaml.load"
            and _is_safe_loader(_kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None))
        ):
            bad.append(where)
        elif re.fullmatch(r"(c?pickle|dill|marshal|shelve|joblib|_pickle)\.(loads?|open|Unpickler)", full):
            bad.append(where)
        elif full == "torch.load":
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                bad.append(where + " without weights_only=True")
        elif full in ("numpy.load", "np.load"):
            ap = _kw(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                bad.append(where + " allow_pickle")
        elif full in ("os.system", "os.popen"):
            bad.append(where)
        elif (
            full.startswith("subprocess.") and isinstance(_kw(node, "shell"), ast.Constant) and _kw(node, "shell").value
        ):
            bad.append(where + " shell=True")
    return bad


def _is_safe_loader(node) -> bool:
    return node is not None and _dotted(node).split(".")[-1] in ("SafeLoader", "CSafeLoader")


def test_the_scanner_catches_what_it_should():
    src = (
        "import yaml, torch, pickle as pk\nfrom pickle import loads\nimport numpy as np\n"
        "eval('1')\nexec('x=1')\nyaml.load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load(s)\n"
        "torch.load(p)\ntorch.load(p, weights_only=True)\ntorch.load(p, weights_only=False)\npk.load(f)\n"
        "loads(b)\nnp.load(p, allow_pickle=True)\nnp.load(p)\nmodel.eval()\n# eval(comment)\n"
        "s = 'exec(in a string)'\n"
    )
    bad = unsafe_calls(src)
    lines = sorted(int(b.split(":")[1]) for b in bad)
    assert lines == [4, 5, 6, 9, 11, 12, 13, 14], bad


def test_no_unsafe_loaders_in_package_and_scripts():
    files = _production_files()
    assert len(files) > 20 and any(f.name == "checkpoint.py" for f in files)
    bad = [b for f in files for b in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))]
    assert not bad, "unsafe calls:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- .ckpt / pickle files


class _Evil:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_bytes(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": _Evil(marker)})


def test_pickles_are_never_loaded(tmp_path):
    """A pickle as export source (.ckpt, .pt, or renamed to final.safetensors / model.safetensors),
    and a pickle beside a checkpoint: refused or ignored, never unpickled."""
    from bulba.export.pipeline import export
    from bulba.train.checkpoint import load_checkpoint

    marker = tmp_path / "pwned"
    for name in ("model.ckpt", "model.pt", "weights.bin"):
        p = tmp_path / name
        p.write_bytes(_evil_bytes(marker))
        with pytest.raises(UserError, match="not a .safetensors file"):
            export(str(p), "f16", tmp_path / "o.gguf", verify=False, mlflow=False, quiet=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "final.safetensors").write_bytes(_evil_bytes(marker))
    (run / "config.json").write_text(json.dumps({"model": {"vocab_size": 300, "n_layer": 1}}))
    with pytest.raises(UserError):
        export(str(run), "f16", tmp_path / "o.gguf", verify=False, mlflow=False, quiet=True)
    ck = tmp_path / "ck" / "step-00000001"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(_evil_bytes(marker))
    (ck / "state.json").write_text(json.dumps({"format": "bulba-checkpoint", "version": 1, "files": {}}))
    (ck / "optimizer.pt").write_bytes(_evil_bytes(marker))
    with pytest.raises(UserError):
        load_checkpoint(ck)
    assert not marker.exists()
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".tmp-*"))


# --------------------------------------------------------------------------- names that are paths


def _evil_paths(*roots: Path) -> list[str]:
    hits = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath.count(os.sep) - str(root).count(os.sep) > 4:
                dirnames[:] = []
                continue
            hits += [os.path.join(dirpath, n) for n in dirnames + filenames if "evil" in n]
    return hits


@pytest.mark.slow  # a real (embedded SQLite) MLflow store, one training step, two exports (~15-40 s)
def test_recipe_names_and_runs_uri_cannot_escape(tmp_path):
    from support.train_data import TINY, build_dataset

    data = build_dataset(tmp_path / "data")
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    out = tmp_path / "run"
    env = dict(
        os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", OMP_NUM_THREADS="1"
    )
    env.pop("MLFLOW_ARTIFACT_URI", None)
    before_repo = set(_evil_paths(REPO))
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "tiny",
            f"data.dir={data}",
            f"out_dir={out}",
            *TINY,
            "model.n_layer=1",
            "train.max_steps=1",
            "train.val_every=0",
            "train.ckpt_every=0",
            "name=../../../evil-name",
            "tracking.run_name=../../../evil-run",
            "tracking.experiment=../../../evil-exp",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "final.safetensors").is_file()
    # nothing named after the recipe escaped the run directory or the tracking store
    assert _evil_paths(tmp_path) == [] and set(_evil_paths(REPO)) == before_repo
    run_id = json.loads((out / "config.json").read_text())["mlflow_run_id"]
    assert run_id
    # runs:/<id>/<path> with '..': MLflow refuses it or resolves it inside the run's artifacts;
    # either way nothing outside the temporary download folder is read or written.
    for uri in (f"runs:/{run_id}/../../../../../../etc", f"runs:/{run_id}/model/../../.."):
        r = subprocess.run(
            [
                sys.executable,
                str(REPO / "export.py"),
                uri,
                "--type",
                "f16",
                "--out",
                str(tmp_path / "x.gguf"),
                "--no-verify",
                "--no-mlflow",
            ],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        if r.returncode != 0:
            assert (
                r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
            ), r.stderr
            assert not (tmp_path / "x.gguf").exists()
        else:  # resolved inside the run's own artifacts: a valid export of that run
            (tmp_path / "x.gguf").unlink()
    assert not [
        p
        for p in Path("/tmp").glob("bulba-export-src-*")
        if p.stat().st_mtime > out.stat().st_mtime - 60 and any(p.iterdir())
    ]


def test_default_spool_folder_keeps_experiment_names_inside(tmp_path, monkeypatch):
    """RunTracker without run_dir spools under runs/.mlflow-spool/<experiment>-...: an experiment
    name with '../' or '/' stays one folder there."""
    from bulba import tracking
    from bulba.tracking.spool import DEFAULT_SPOOL_ROOT

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens: no server needed
    t = tracking.RunTracker("../../evil/exp", "r", start_timeout=0, finish_timeout=0, quiet=True)
    root = (tmp_path / DEFAULT_SPOOL_ROOT).resolve()
    try:
        assert t.run_dir.resolve().parent == root, t.run_dir
    finally:
        t.finish("KILLED")
    hits = _evil_paths(tmp_path.parent)
    assert hits and all(Path(h).resolve().parent == root for h in hits), hits


# --------------------------------------------------------------------------- the documented server


def _shell_commands(md: str) -> list[str]:
    """Commands in fenced code blocks, backslash continuations joined."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", md, flags=re.DOTALL):
        out += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return out


def test_documented_mlflow_server_binds_localhost_and_mentions_auth():
    docs = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
    servers = []
    for f in docs:
        for cmd in _shell_commands(f.read_text(encoding="utf-8")):
            if re.search(r"\bmlflow (server|ui)\b", cmd):
                servers.append((f.name, cmd))
                host = re.search(r"--host[ =](\S+)", cmd) or re.search(r"(?:^|\s)-h[ =](\S+)", cmd)
                assert host is None or host.group(1) in ("127.0.0.1", "localhost"), (f.name, cmd)
    assert any("server" in c for _, c in servers), "no `mlflow server` command documented"
    text = (REPO / "docs" / "tracking.md").read_text(encoding="utf-8")
    assert "--host 127.0.0.1" in text and re.search(r"[Aa]uthentication", text) and "basic-auth" in text
    # and the test server binds to loopback only
    fx = (REPO / "tests" / "support" / "mlflow_server.py").read_text(encoding="utf-8")
    assert "0.0.0.0" not in fx and "127.0.0.1" in fx

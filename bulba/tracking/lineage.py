"""Lineage: what links the stages' MLflow runs (dataset -> training run -> export -> model version).

The dataset input both prepare and training log (same name, digest and schema: MLflow shows
both runs on one dataset), the code version, and the recipe as flat MLflow params.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def dataset_input(data_dir: Path, dtype: str, digest: str | None):
    """The prepared dataset as an MLflow dataset (a MetaDataset: metadata only, no copy)."""
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.types import Schema, TensorSpec

    schema = Schema([TensorSpec(np.dtype(dtype), (-1,), "tokens")])
    return MetaDataset(
        source=LocalArtifactDatasetSource(str(Path(data_dir).resolve())),
        name=Path(data_dir).name,
        digest=(digest or "unknown")[:36],
        schema=schema,
    )  # MLflow's digest limit


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]  # the checkout bulba/ lives in
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, tuple)) else v
    return out

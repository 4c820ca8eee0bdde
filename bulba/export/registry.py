"""Exports in MLflow: one run per export, linked to its training run; GGUF in the Model Registry.

Lineage: dataset digest -> training run (config.json's mlflow_run_id) -> export run (tags
`bulba.source_run`, and nested under the training run when both share an experiment) ->
registered model version (tags: type, vocab size, parameter count, context length, source
run, sha256).

A registered version is an MLflow pyfunc model whose only artifact is the GGUF, so both
`mlflow.pyfunc.load_model("models:/NAME/VERSION").predict(["prompt"])` (greedy completion
through llama.cpp) and `fetch_gguf("models:/NAME/VERSION")` (the file itself) work.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bulba.errors import UserError


def fetch_gguf(model_uri: str, dst: str | os.PathLike | None = None) -> Path:
    """`models:/NAME/VERSION` (or any artifact URI) -> local path of its .gguf."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst) if dst else None))
    hits = [local] if local.suffix == ".gguf" else sorted(local.rglob("*.gguf"))
    if not hits:
        raise UserError(f"{model_uri} holds no .gguf file")
    return hits[0]


def place_in_output_models(path: Path, name: str, type_name: str, root: Path | None = None) -> Path:
    """Copy (hard link when possible) the GGUF to output_models/<name>-<type>.gguf, atomically."""
    dst_dir = (root or Path.cwd()) / "output_models"
    dst = dst_dir / f"{name}-{type_name}.gguf"
    if dst.parent != dst_dir or dst.name.startswith(".") or ".." in Path(dst.name).parts:
        raise UserError(f"model name {name!r} would place the GGUF outside {dst_dir}; use a plain name")
    dst_dir.mkdir(parents=True, exist_ok=True)
    if dst.resolve() == path.resolve():
        return dst
    tmp = dst_dir / f".tmp-{dst.name}.{os.getpid()}"
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


def log_export(
    *,
    src,
    gguf_path: Path,
    type_name: str,
    sha256: str,
    report=None,
    hf_report=None,
    modelfile: Path | None = None,
    register: str | None = None,
    experiment: str | None = None,
    timings: dict | None = None,
) -> dict:
    """The export run (and, with `register`, the new model version); returns ids and URIs."""
    import mlflow
    from mlflow import MlflowClient

    from bulba.export.pyfunc import GGUFModel
    from bulba.tracking import DEFAULT_EXPERIMENT, check_reachable, ensure_experiment, setup_mlflow

    check_reachable("cannot log the export" + (f" or register '{register}'" if register else ""))
    setup_mlflow(experiment or DEFAULT_EXPERIMENT)
    client = MlflowClient()
    exp_id = None
    tags = {"bulba.stage": "export", "bulba.type": type_name, "bulba.sha256": sha256}
    if src.mlflow_run_id:
        tags["bulba.source_run"] = src.mlflow_run_id
        try:
            train_run = client.get_run(src.mlflow_run_id)
        except Exception:  # the training run lives in another store: keep the id as a tag
            train_run = None
        if train_run is not None and experiment is None:
            # The training run's experiment, completed like any other on first use (kind, note).
            exp_id = ensure_experiment(client, client.get_experiment(train_run.info.experiment_id).name)
            tags["mlflow.parentRunId"] = src.mlflow_run_id  # shows the export under its training run
    if src.config.get("dataset_digest"):
        tags["bulba.dataset_digest"] = src.config["dataset_digest"]
    cfg = src.model
    info = {
        "type": type_name,
        "vocab_size": cfg.vocab_size,
        "param_count": src.num_params(),
        "context_length": cfg.ctx_len,
        "source_run": src.mlflow_run_id or "",
        "sha256": sha256,
    }
    with mlflow.start_run(experiment_id=exp_id, run_name=f"export-{src.name}-{type_name}", tags=tags) as run:
        mlflow.log_params(
            {
                **info,
                "n_layer": cfg.n_layer,
                "n_embd": cfg.n_embd,
                "n_head": cfg.n_head,
                "n_kv_head": cfg.n_kv_head,
                "ffn_hidden": cfg.ffn_hidden,
                "gguf": str(gguf_path),
                "file_bytes": gguf_path.stat().st_size,
            }
        )
        metrics = dict(timings or {})
        if report is not None:
            metrics |= {f"verify.{k}": v for k, v in report.metrics().items()}
            mlflow.log_text(report.verdict + "\n", "verify.txt")
            mlflow.set_tag("bulba.verdict", report.verdict[:5000])
        if hf_report is not None:
            metrics |= {f"hf.{k}": float(v) for k, v in hf_report.items()}
        if metrics:
            mlflow.log_metrics(metrics)
        if modelfile is not None:
            mlflow.log_artifact(str(modelfile))
        out = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}
        if register:
            mi = mlflow.pyfunc.log_model(
                name="gguf",
                python_model=GGUFModel(),  # bulba.export.pyfunc
                artifacts={"gguf": str(gguf_path)},
                # Explicit requirements: inferring them would import and run the model in a subprocess.
                pip_requirements=["mlflow>=3.17,<4", "llama-cpp-python>=0.3.8", "bulbagpt"],
                registered_model_name=register,
                tags={k: str(v) for k, v in info.items()},
            )
            version = str(mi.registered_model_version)
            for k, v in info.items():
                client.set_model_version_tag(register, version, k, str(v))
            client.update_model_version(
                register,
                version,
                description=(
                    f"{src.name} as GGUF {type_name} ({info['param_count']:,} parameters, vocab {cfg.vocab_size}, "
                    f"context {cfg.ctx_len}); sha256 {sha256}" + (f"; {report.verdict}" if report is not None else "")
                ),
            )
            mlflow.set_tag("bulba.registered", f"{register}/{version}")
            out |= {"model_uri": f"models:/{register}/{version}", "version": version, "name": register}
    out["info"] = json.loads(json.dumps(info))
    return out

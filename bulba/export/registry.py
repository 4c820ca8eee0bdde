"""Exports in MLflow: one run per export, linked to its training run; GGUF in the Model Registry.

Lineage: dataset digest -> training run (config.json's mlflow_run_id) -> export run (tags
`bulba.source_run`, and nested under the training run when both share an experiment) ->
registered model version (tags: type, vocab size, parameter count, context length, source
run, sha256, and the figure it is ranked by: val_bpb or val_loss of the source training run), a
description (preset, data digest, steps, quantization, parity figures) and two aliases current
after every registration (`move_aliases`): `@best`, the version with the lowest figure, and
`@latest`, MLflow's built-in alias for the newest version.

A registered version is an MLflow pyfunc model whose only artifact is the GGUF, so both
`mlflow.pyfunc.load_model("models:/NAME/VERSION").predict(["prompt"])` (greedy completion
through llama.cpp) and `fetch_gguf("models:/NAME/VERSION")` (the file itself) work, and so do
`models:/NAME@best` and `models:/NAME@latest`.
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


# What a version is ranked by, in order of preference, lower is better: bits per byte compare across
# tokenizers, a loss per token only between models with the same vocabulary. The version tag and the
# training run's metric it comes from.
FIGURES = (("val_bpb", "val/bpb"), ("val_loss", "val/loss"))


def version_figure(tags: dict) -> tuple[str, float] | None:
    """(name, value) of the figure a version carries, or None."""
    for name, _ in FIGURES:
        try:
            return name, float(tags[name])
        except (KeyError, TypeError, ValueError):
            continue
    return None


def better(new: tuple[str, float] | None, old: tuple[str, float] | None) -> tuple[bool, str]:
    """Does a version with figure `new` take @best from one with figure `old`? And why (one phrase)."""
    if old is None:
        return True, "the current best carries no figure" if new is None else f"{new[0]} {new[1]:.4g}"
    if new is None:
        return False, f"no figure to compare with the best's {old[0]} {old[1]:.4g}"
    if new[0] != old[0]:  # e.g. bpb against a per-token loss: not comparable, the holder keeps it
        return False, f"its {new[0]} is not comparable with the best's {old[0]}"
    if new[1] < old[1]:
        return True, f"{new[0]} {new[1]:.4g} < {old[1]:.4g}"
    return False, f"{new[0]} {new[1]:.4g} >= best's {old[1]:.4g}"


def move_aliases(client, name: str, version: str, figure: tuple[str, float] | None) -> list[str]:
    """@best to `version` when it is better than the holder (or there is none); @latest is MLflow's.
    Returns what happened, one phrase per alias, for export to print. (Two exports registering
    the same model at the same moment can race on @best; the registry has no compare-and-set.)"""
    # `latest` is MLflow's own: a reserved alias name (setting it is refused) that always resolves
    # to the highest version, so `models:/NAME@latest` follows every registration by itself.
    latest = client.get_model_version_by_alias(name, "latest").version
    said = [f"@latest -> v{latest}"]
    held = client.get_registered_model(name).aliases.get("best")  # {alias: version}
    if held is None:
        client.set_registered_model_alias(name, "best", version)
        return [*said, f"@best -> v{version} (no version held it)"]
    holder = client.get_model_version(name, str(held))
    take, why = better(figure, version_figure(holder.tags))
    if take:
        client.set_registered_model_alias(name, "best", version)
        return [*said, f"@best -> v{version} from v{holder.version} ({why})"]
    return [*said, f"@best stays v{holder.version} ({why})"]


def trained_steps(src) -> int | None:
    """Optimizer steps behind the exported weights: final.safetensors records them, a checkpoint
    folder is named after them."""
    try:
        from safetensors import safe_open

        with safe_open(str(src.weights), "np") as f:
            step = (f.metadata() or {}).get("bulba.step")
        if step is not None:
            return int(step)
    except Exception:  # noqa: BLE001 - an unreadable header was already refused by open_source
        pass
    parent = src.weights.parent.name
    return int(parent[5:]) if parent.startswith("step-") and parent[5:].isdigit() else None


def describe_version(src, type_name: str, info: dict, steps: int | None, figure, report) -> str:
    """The version description the registry UI shows: what the file is and how well it matches."""
    recipe = src.config.get("recipe") or {}
    cfg = src.model
    ranked = f"{figure[0]} {figure[1]:.4f}" if figure else "no figure (the training run logged no val/loss)"
    lines = [
        f"{src.name} as GGUF {type_name}: preset {recipe.get('name') or 'unknown'}, "
        f"{info['param_count']:,} parameters, vocab {cfg.vocab_size}, context {cfg.ctx_len}.",
        f"Data: dataset digest {src.config.get('dataset_digest') or 'unknown'}; "
        f"steps: {steps if steps is not None else 'unknown'}; training run {info['source_run'] or 'unknown'}.",
        *(
            [f"Fine-tuned from {recipe['init_from']}" + (" on conversations." if src.config.get("chat") else ".")]
            if recipe.get("init_from")
            else []
        ),
        f"Ranked by: {ranked}.",
        f"Parity: {report.verdict}" if report is not None else "Parity: not verified (--no-verify).",
        f"sha256 {info['sha256']}",
    ]
    return "\n\n".join(lines)


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
    train_run = None
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
    # The figure the version is ranked by: the training run's last validation (its final one).
    train_metrics = train_run.data.metrics if train_run is not None else {}
    # Lineage of a fine-tuned (chat) model: base run -> this training run -> this export.
    parent = train_run.data.tags.get("bulba.parent_run_id") if train_run is not None else None
    if parent:
        tags["bulba.parent_run_id"] = parent
    figures = {tag: float(train_metrics[key]) for tag, key in FIGURES if key in train_metrics}
    steps = trained_steps(src)
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
            # Beside the figure, the columns a user compares versions by in the registry UI.
            extra = {
                "preset": (src.config.get("recipe") or {}).get("name") or "unknown",
                "dataset_digest": src.config.get("dataset_digest") or "unknown",
                "steps": steps if steps is not None else "unknown",
                "chat": bool(src.config.get("chat")),
                "parent_run": parent or "none",
                **{k: repr(v) for k, v in figures.items()},
            }
            for k, v in extra.items():
                client.set_model_version_tag(register, version, k, str(v))
            figure = version_figure(figures)
            client.update_model_version(
                register, version, description=describe_version(src, type_name, info, steps, figure, report)
            )
            out["aliases"] = move_aliases(client, register, version, figure)
            mlflow.set_tag("bulba.registered", f"{register}/{version}")
            out |= {"model_uri": f"models:/{register}/{version}", "version": version, "name": register}
    out["info"] = json.loads(json.dumps(info))
    return out

"""eval.py's results: the Markdown table, --json in the benchmarks' form, and MLflow.

MLflow: metrics `eval/<name>/bpb` and `eval/<name>/tokens_per_word` (one per text file) on
the training run that made the model, so the runs page compares runs per language side by side
(a GGUF's figures carry its type in the name: `eval/<name>/bpb.q8_0`, so a checkpoint and its
quantizations sit next to each other instead of overwriting one another); for a registered
version (models:/), the same keys as that version's tags.
"""

from __future__ import annotations

import time

from bulba.atomic import write_json
from bulba.benchmarks.common import hardware, markdown_table
from bulba.errors import UserError
from bulba.eval.bpb import Score


def table(label: str, kind: str, scores: list[Score]) -> str:
    rows = [
        {
            "text": s.name,
            "bits/byte": f"{s.bits_per_byte:.4f}",
            "xz -9e bits/byte": f"{s.xz_bits_per_byte:.4f}",
            "beats xz": "yes" if s.bits_per_byte < s.xz_bits_per_byte else "no",
            "tokens/word": f"{s.tokens_per_word:.3f}",
            "bytes": s.bytes,
            "tokens": s.tokens,
        }
        for s in scores
    ]
    return f"### eval.py {label} ({kind})\n\n" + markdown_table(rows)


def write_report(path, label: str, kind: str, ctx: int, stride: int, scores: list[Score]) -> None:
    write_json(
        path,
        {
            "benchmark": "eval",
            "hardware": hardware(),
            "rows": [s.row() for s in scores],
            "extra": {"source": label, "backend": kind, "ctx": ctx, "stride": stride},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


def metric_names(score: Score, suffix: str = "") -> dict[str, float]:
    return {
        f"eval/{score.name}/bpb{suffix}": score.bits_per_byte,
        f"eval/{score.name}/tokens_per_word{suffix}": score.tokens_per_word,
    }


def check_loggable(model) -> None:
    """Before scoring: there must be somewhere to log to, reachable."""
    from bulba.tracking import check_reachable

    if model.lineage.version is None and model.lineage.run_id is None:
        raise UserError(
            f"--register-metrics: {model.label} records no MLflow training run (config.json's mlflow_run_id "
            "or the GGUF's bulba.source_run); score it without --register-metrics"
        )
    check_reachable("cannot log the figures (--register-metrics)")


def log_scores(model, scores: list[Score], suffix: str = "") -> str:
    """The figures to MLflow; returns where they went, for eval.py to print."""
    import mlflow
    from mlflow import MlflowClient

    from bulba.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    figures = {k: v for s in scores for k, v in metric_names(s, suffix).items()}
    try:
        if model.lineage.version is not None:
            name, version = model.lineage.version
            for k, v in figures.items():
                client.set_model_version_tag(name, version, k, f"{v:.6g}")
            return f"tags on registered model {name} version {version}"
        run_id = model.lineage.run_id
        now = int(time.time() * 1000)
        client.log_batch(
            run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in figures.items()], synchronous=True
        )
        return f"metrics on training run {run_id}"
    except Exception as e:  # noqa: BLE001 - the run lives in another store, the server went away...
        msg = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot log the figures to MLflow ({msg}); check MLFLOW_TRACKING_URI") from None

"""eval.py's flow: open the model, read the texts, score, report, log."""

from __future__ import annotations

import sys

from bulba.eval.bpb import default_stride, evaluate, read_text
from bulba.eval.report import check_loggable, log_scores, table, write_report
from bulba.eval.sources import GGUFModel, open_model


def gguf_type(model) -> str:
    """The GGUF's file type as export.py names it (f32, f16, q8_0, ...), from general.file_type."""
    import gguf

    from bulba.export.gguf import read_back

    ft = read_back(model.label)["kv"].get("general.file_type")
    try:
        return gguf.LlamaFileType(int(ft)).name.split("_", 1)[1].lower()
    except (TypeError, ValueError):
        return "gguf"


def run(source: str, files: list[str], max_kb: float | None, json_path: str | None, register: bool):
    texts = [read_text(f, max_kb) for f in files]  # bad text files fail before a model loads
    model = open_model(source)
    try:
        if register:
            check_loggable(model)
        scores = evaluate(model, texts)
        print(table(source, model.kind, scores))
        if json_path:
            write_report(json_path, source, model.kind, model.ctx, default_stride(model.ctx), scores)
        if register:
            # A GGUF's figures on its training run carry its type: eval/be/bpb.q8_0 beside the
            # checkpoint's eval/be/bpb. A registered version is one file: plain keys.
            suffix = f".{gguf_type(model)}" if isinstance(model, GGUFModel) and model.lineage.version is None else ""
            where = log_scores(model, scores, suffix)
            print(f"\nlogged to MLflow: {where}", file=sys.stderr)
        return scores
    finally:
        model.close()

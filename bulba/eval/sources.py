"""What eval.py scores: SOURCE resolved to a model that tokenizes text and scores windows.

    run directory        final.safetensors, else its newest checkpoint     -> PyTorch
    FILE.safetensors     config.json and tokenizer.json beside it (or two levels up)
    runs:/<run_id>       the training run's artifacts in MLflow
    FILE.gguf            real llama.cpp (llama-cpp-python), llama.cpp's own tokenizer
    models:/NAME/VERSION a registered GGUF (also models:/NAME@ALIAS)    -> llama.cpp

Checkpoints are opened (and checked) by bulba.export.source, GGUFs loaded by
bulba.export.llamacpp, registered versions fetched by bulba.export.registry. Each model also
says where its figures belong in MLflow (`Lineage`): the training run recorded in config.json
or in the GGUF's `bulba.source_run`, or the registered version itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bulba.errors import UserError
from bulba.eval.bpb import nll_of_logits

FORMS = "a run directory, a .safetensors file, runs:/<run_id>, a .gguf file or models:/NAME/VERSION"


@dataclass
class Lineage:
    run_id: str | None = None  # the MLflow training run that made the weights
    version: tuple[str, str] | None = None  # (registered model name, version)


class TorchModel:
    """A checkpoint in PyTorch, fp32 (bulba.export.source.load_torch_model)."""

    kind = "pytorch"
    batch = 8  # windows per forward pass

    def __init__(self, src):
        from bulba.data.tokenizer import encoder_for_documents, load_tokenizer
        from bulba.export.source import load_torch_model

        self.src = src
        self.model = load_torch_model(src)
        # The encoder that wrote the training data (BOS text EOS; special-token strings as text).
        self._enc = encoder_for_documents(load_tokenizer(src.tokenizer_path))
        self.bos_id = src.tokenizer.bos_id
        self.ctx = src.model.ctx_len
        self.lineage = Lineage(run_id=src.mlflow_run_id)
        self.label = str(src.weights)

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode(text).ids[1:-1]

    def nll(self, ids: list[int], wins, advance=lambda n: None) -> float:
        """Summed nats of the scored tokens of `wins` (bulba.eval.bpb.windows)."""
        import torch
        import torch.nn.functional as F

        total = 0.0
        w = self.model.output_weight()
        with torch.inference_mode():
            for i in range(0, len(wins), self.batch):
                group = wins[i : i + self.batch]
                # Windows of one length go in one pass (all but the last few are full length).
                for length in sorted({e - s for s, e, _ in group}):
                    same = [x for x in group if x[1] - x[0] == length]
                    x = torch.tensor([[self.bos_id, *ids[s:e]] for s, e, _ in same])
                    h = self.model.hidden(x)
                    for row, (s, e, first) in zip(h, same):
                        # position j predicts input j + 1: text token t sits at t - s + 1
                        logits = F.linear(row[first - s : e - s], w).float()
                        y = torch.tensor(ids[first:e])
                        total += float(F.cross_entropy(logits, y, reduction="sum"))
                advance(len(group))
        return total

    def close(self) -> None:
        self.src.cleanup()


class GGUFModel:
    """A GGUF in llama.cpp: its own tokenizer, logits of every position of a window in one batch."""

    kind = "llama.cpp"

    def __init__(self, path: Path, lineage: Lineage, tmp: str | None = None):
        from bulba.export.gguf import SOURCE_RUN_KEY, read_back
        from bulba.export.llamacpp import LlamaCpp, llama_cpp_available

        self._tmp = tmp
        if not llama_cpp_available():
            raise UserError("scoring a GGUF needs llama-cpp-python (pip install llama-cpp-python)")
        kv = read_back(path)["kv"]  # a file that is not GGUF fails here, in one line
        arch = kv.get("general.architecture")
        self.ctx = int(kv.get(f"{arch}.context_length") or 0)
        bos = kv.get("tokenizer.ggml.bos_token_id")
        if not self.ctx or bos is None:
            raise UserError(f"{path} has no context length or BOS token id in its metadata; re-export it")
        self.bos_id = int(bos)
        if lineage.run_id is None and kv.get(SOURCE_RUN_KEY):
            lineage.run_id = str(kv[SOURCE_RUN_KEY])
        self.lineage = lineage
        self.label = str(path)
        # OMP_NUM_THREADS sets llama.cpp's threads as it sets torch's: on busy shared cores, 2
        # threads decoded a 256-token window 19x slower than 1 (1.48 s vs 0.078 s, tiny f32).
        threads = os.environ.get("OMP_NUM_THREADS", "")
        n_threads = int(threads) if threads.isdigit() and int(threads) > 0 else None
        self.cpp = LlamaCpp(path, n_ctx=self.ctx, n_threads=n_threads)  # UserError if it cannot load

    def tokenize(self, text: str) -> list[int]:
        return self.cpp.tokenize(text, add_special=False, parse_special=False)

    def nll(self, ids: list[int], wins, advance=lambda n: None) -> float:
        total = 0.0
        for s, e, first in wins:
            # One decode; logits only where they score (input position j predicts text token
            # s + j): the output layer is most of a small model's compute (tiny: 8.2M of 11.2M).
            logits = self.cpp.logits([self.bos_id, *ids[s:e]], first=first - s)
            total += nll_of_logits(logits[: e - first], np.asarray(ids[first:e]))
            advance(1)
        return total

    def close(self) -> None:
        self.cpp.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _registered(uri: str) -> tuple[str, str]:
    """models:/NAME/VERSION or models:/NAME@ALIAS -> (name, version), from the registry."""
    from mlflow import MlflowClient

    rest = uri[len("models:/") :].strip("/")
    client = MlflowClient()
    try:
        if "@" in rest:
            name, alias = rest.rsplit("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, version = rest.rpartition("/")
        if not name or not version.isdigit():
            raise ValueError(f"expected models:/NAME/VERSION or models:/NAME@ALIAS, got {uri}")
        client.get_model_version(name, version)
        return name, version
    except Exception as e:  # noqa: BLE001 - MlflowException and friends: one line for the user
        msg = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot find {uri} in the MLflow Model Registry ({msg})") from None


def open_model(source: str):
    """SOURCE -> TorchModel or GGUFModel (close() it); UserError for anything unusable."""
    if source.startswith("models:/"):
        import mlflow

        from bulba.export.registry import fetch_gguf
        from bulba.tracking import check_reachable, tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        check_reachable(f"cannot fetch {source}")
        name, version = _registered(source)
        tmp = tempfile.mkdtemp(prefix="bulba-eval-")
        try:
            path = fetch_gguf(f"models:/{name}/{version}", tmp)
            return GGUFModel(path, Lineage(version=(name, version)), tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if source.startswith("runs:/"):
        from bulba.export.source import open_source

        return TorchModel(open_source(source))
    p = Path(source)
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        if not p.is_file():
            raise UserError(f"model file {p} does not exist")
        return GGUFModel(p, Lineage())
    if not p.exists():
        raise UserError(f"source {source} does not exist; give {FORMS}")
    if p.is_dir() or p.suffix == ".safetensors":
        from bulba.export.source import open_source

        return TorchModel(open_source(source, checkpoint_fallback=True))
    raise UserError(f"source {source} is not a model eval.py can score; give {FORMS}")

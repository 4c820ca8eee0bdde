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

from bulba.data.tokenizer import EOS
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
    batch = 8  # a forward pass holds up to batch * ctx positions

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

    def document_ids(self, doc: str) -> list[int]:
        """The tokens prepare writes for `doc` after its BOS: the text's, then EOS."""
        return self._enc.encode(doc).ids[1:]

    def nll(self, work, advance=lambda n: None) -> float:
        """Summed nats of the targets of `work` (bulba.eval.bpb.evaluate's windows)."""
        import torch
        import torch.nn.functional as F

        total = 0.0
        w = self.model.output_weight()
        # Windows in order of length, batched up to a budget of positions and right-padded:
        # under the causal mask a padded tail changes nothing before it.
        order = sorted(range(len(work)), key=lambda i: len(work[i][0]))
        budget = self.batch * self.ctx
        with torch.inference_mode():
            i = 0
            while i < len(order):
                j = i + 1
                while j < len(order) and (j - i + 1) * len(work[order[j]][0]) <= budget:
                    j += 1
                group = [work[k] for k in order[i:j]]
                longest = len(group[-1][0])
                x = torch.tensor([inp + [self.bos_id] * (longest - len(inp)) for inp, _, _ in group])
                h = self.model.hidden(x)
                for row, (_, first, targets) in zip(h, group):
                    logits = F.linear(row[first : first + len(targets)], w).float()
                    total += float(F.cross_entropy(logits, torch.tensor(targets), reduction="sum"))
                advance(len(group))
                i = j
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
        # The document end of the training data is <|end_of_text|>, also in a chat model's GGUF,
        # whose EOS is <|eot_id|> (bulba.export.gguf.eos_id).
        end = self.cpp.tokenize(EOS, add_special=False, parse_special=True)
        self.end_id = end[0] if len(end) == 1 else int(kv.get("tokenizer.ggml.eos_token_id"))

    def document_ids(self, doc: str) -> list[int]:
        """llama.cpp's tokens for `doc`, then the document end token."""
        return [*self.cpp.tokenize(doc, add_special=False, parse_special=False), self.end_id]

    def nll(self, work, advance=lambda n: None) -> float:
        total = 0.0
        for inputs, first, targets in work:
            # One decode; logits only where they score: the output layer is most of a small
            # model's compute (tiny: 8.2M of 11.2M parameters).
            logits = self.cpp.logits(inputs, first=first)
            total += nll_of_logits(logits[: len(targets)], np.asarray(targets))
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

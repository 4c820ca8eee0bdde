"""The registered model's pyfunc flavor: a GGUF run through llama.cpp.

Its own module so that `bulba.export.registry` (and export.py without --register) does not import
mlflow.pyfunc; MLflow pickles the class by reference, so loading a version needs bulba.
"""

from __future__ import annotations

import mlflow.pyfunc


class GGUFModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: predict(list of prompts) -> greedy completions from llama.cpp."""

    def load_context(self, context):
        from bulba.export.gguf import read_back

        self.path = context.artifacts["gguf"]
        self.ctx_len = int(read_back(self.path)["kv"].get("llama.context_length", 512))

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        from bulba.export.llamacpp import LlamaCpp

        try:
            n_new = int((params or {}).get("max_tokens", 32))
        except (TypeError, ValueError):
            raise ValueError(f"max_tokens must be an integer, got {(params or {}).get('max_tokens')!r}") from None
        # The model's context bounds prompt + completion: at most ctx_len - 1 new tokens, and the
        # prompt keeps its last ctx_len - n_new tokens (never an empty or over-long decode).
        n_new = max(1, min(n_new, self.ctx_len - 1))
        out = []
        with LlamaCpp(self.path, n_ctx=self.ctx_len) as llm:
            for prompt in model_input:
                ids = llm.tokenize(str(prompt))[-(self.ctx_len - n_new) :]
                out.append(llm.detokenize(llm.greedy(ids, n_new)))
        return out

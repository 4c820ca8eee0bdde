"""The real llama.cpp, through llama-cpp-python's low-level (ctypes) API.

Low-level on purpose: the high-level `Llama` class does not let us set what verification
needs to compare like with like:
- `use_extra_bufts = False`: on CPUs with AMX the extra (repacking) buffer types crashed
  decoding of quantized models (DESIGN.md);
- F32 K/V cache and no flash attention: the default F16 cache would add its own rounding,
  and we want to measure the weights' format only;
- logits for every position of one batch.
llama.cpp's own log lines are kept in a small buffer (shown when a load fails) instead of
flooding stderr.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
from pathlib import Path

import numpy as np

from bulba.errors import UserError

_LOG: collections.deque[str] = collections.deque(maxlen=40)


@functools.lru_cache(maxsize=1)
def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401  (loads the shared library)
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _lib():
    import llama_cpp as L

    @L.llama_log_callback
    def _log(level, text, user_data):  # noqa: ARG001
        if text:
            _LOG.append(text.decode("utf-8", "replace").rstrip("\n"))

    L.llama_log_set(_log, ctypes.c_void_p(0))
    _lib.callback = _log  # keep the ctypes callback alive
    L.llama_backend_init()
    return L


def last_log(n: int = 3) -> str:
    lines = [x for x in _LOG if x.strip()]
    return " | ".join(lines[-n:])


def _threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def quantize(src: Path, dst: Path, ftype: int, nthread: int | None = None) -> None:
    L = _lib()
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread or _threads()
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise UserError(f"llama.cpp's quantizer failed (code {rc}): {last_log()}")


def apply_chat_template(template: bytes | str, messages: list[dict], add_assistant: bool) -> str:
    """`messages` formatted by llama.cpp (`llama_chat_apply_template`): it recognizes the
    template (ours as its built-in "llama3") and formats natively; it adds no BOS."""
    L = _lib()
    tmpl = template.encode() if isinstance(template, str) else template
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]  # alive during the call
    arr = (L.llama_chat_message * len(keep))()
    for i, (r, c) in enumerate(keep):
        arr[i].role, arr[i].content = r, c
    size = 2 * sum(len(r) + len(c) for r, c in keep) + 1024
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = L.llama_chat_apply_template(tmpl, arr, len(keep), add_assistant, buf, size)
        if n < 0:
            raise RuntimeError(f"llama_chat_apply_template does not know this template (code {n})")
        if n <= size:
            return buf.raw[:n].decode("utf-8")
        size = n + 1
    raise RuntimeError("llama_chat_apply_template: the output kept growing")


class LlamaCpp:
    """One GGUF loaded in llama.cpp with a context of `n_ctx` tokens (use as a context manager)."""

    def __init__(self, path: str | os.PathLike, n_ctx: int, n_threads: int | None = None):
        L = self.L = _lib()
        mp = L.llama_model_default_params()
        if hasattr(mp, "use_extra_bufts"):
            mp.use_extra_bufts = False
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise UserError(f"llama.cpp could not load {path}: {last_log()}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = n_threads or _threads()
        cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        self.n_ctx = n_ctx
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise UserError(f"llama.cpp could not create a context for {path}: {last_log()}")

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.L.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} slots")
        return list(buf[:n])

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def decode(self, ids: list[int], start: int = 0, all_logits: bool = True, first: int = 0) -> np.ndarray:
        """Feed `ids` at positions start..; logits [len(ids) - first or 1, n_vocab] as float32:
        with `all_logits`, of ids[first:] (llama.cpp skips the output layer for the others)."""
        L, n = self.L, len(ids)
        if start + n > self.n_ctx:
            raise ValueError(f"{start + n} tokens exceed the context of {self.n_ctx}")
        batch = L.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, t in enumerate(ids):
                batch.token[i] = t
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if ((all_logits and i >= first) or i == n - 1) else 0
            rc = L.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}: {last_log()}")
        finally:
            L.llama_batch_free(batch)
        rows = n - min(first, n - 1) if all_logits else 1
        ptr = L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab)).astype(np.float32, copy=True)

    def logits(self, ids: list[int], first: int = 0) -> np.ndarray:
        """Logits of positions first.. of `ids` fed from position 0 (a fresh sequence)."""
        self.clear()
        return self.decode(ids, first=first)

    def greedy(self, prompt: list[int], n_new: int) -> list[int]:
        self.clear()
        last = self.decode(prompt, 0, all_logits=False)[-1]
        out, pos = [], len(prompt)
        for i in range(n_new):
            tok = int(np.argmax(last))
            out.append(tok)
            if i + 1 < n_new:
                last = self.decode([tok], pos, all_logits=False)[-1]
                pos += 1
        return out

    def chat_template(self) -> str | None:
        """The GGUF's `tokenizer.chat_template`, as llama.cpp read it."""
        t = self.L.llama_model_chat_template(self.model, None)
        return t.decode("utf-8") if t else None

    def apply_chat_template(self, messages: list[dict], add_assistant: bool) -> str:
        """llama.cpp's own formatting of `messages` with the file's template."""
        return apply_chat_template(self.L.llama_model_chat_template(self.model, None), messages, add_assistant)

    def is_eog(self, tok: int) -> bool:
        """Does llama.cpp end generation at `tok` (EOS, EOT and the like)?"""
        return bool(self.L.llama_vocab_is_eog(self.vocab, tok))

    def reply(self, prompt: list[int], max_new: int) -> list[int]:
        """Greedy tokens after `prompt` until llama.cpp's end of generation (included) or `max_new`."""
        self.clear()
        last = self.decode(prompt, 0, all_logits=False)[-1]
        out, pos = [], len(prompt)
        while len(out) < max_new:
            tok = int(np.argmax(last))
            out.append(tok)
            if self.is_eog(tok) or pos + 1 >= self.n_ctx:
                break
            last = self.decode([tok], pos, all_logits=False)[-1]
            pos += 1
        return out

    def detokenize(self, ids: list[int]) -> str:
        """Text of `ids` as llama.cpp renders it (control tokens omitted)."""
        out = bytearray()
        buf = ctypes.create_string_buffer(256)
        for t in ids:
            n = self.L.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            out += buf.raw[: max(n, 0)]
        return out.decode("utf-8", "replace")

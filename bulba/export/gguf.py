"""Native GGUF writer for the `llama` architecture (no llama.cpp converter, no network).

Reference: llama.cpp's convert_hf_to_gguf.py (LlamaModel) and gguf-py's GGUFWriter. What
llama.cpp needs, and what went wrong when it was missing, is in DESIGN.md "Facts worth
knowing": token rows == token list length, unique tokens, pre-tokenizer "llama-bpe",
explicit BOS/EOS and add_bos_token, Q/K permuted to the interleaved RoPE layout, tied
embeddings written once (no output.weight), and no extra tensors.

The file is streamed: tensor infos are computed from the safetensors header, then each
weight is read, converted and written before the next is touched, so peak memory is about
one tensor (plus its quantized copy), not the model.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from bulba.errors import UserError
from bulba.export.source import Source
from bulba.model.weights import Tensor, layout, permute_rotate_half


# name -> (GGML tensor type for 2-D weights, general.file_type). Quantized in numpy by gguf-py.
def numpy_types():
    import gguf

    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {
        "f32": (Q.F32, F.ALL_F32),
        "f16": (Q.F16, F.MOSTLY_F16),
        "bf16": (Q.BF16, F.MOSTLY_BF16),
        "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
        "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1),
        "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
        "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
        "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
    }


# K-quant mixes come from llama.cpp's own quantizer (llama_model_quantize); values are
# llama.cpp's `llama_ftype` (equal to gguf.LlamaFileType). All K-quant blocks are 256 wide.
LLAMA_CPP_TYPES = {
    "q6_k": 18,
    "q5_k_m": 17,
    "q5_k_s": 16,
    "q4_k_m": 15,
    "q4_k_s": 14,
}
K_QUANT_BLOCK = 256


def all_types() -> list[str]:
    return list(numpy_types()) + list(LLAMA_CPP_TYPES)


def available_types() -> list[str]:
    from bulba.export.llamacpp import llama_cpp_available

    return list(numpy_types()) + (list(LLAMA_CPP_TYPES) if llama_cpp_available() else [])


def block_size(type_name: str) -> int:
    import gguf

    if type_name in LLAMA_CPP_TYPES:
        return K_QUANT_BLOCK
    return gguf.GGML_QUANT_SIZES[numpy_types()[type_name][0]][0]


def check_type(type_name: str, src: Source) -> None:
    """Unknown type, missing quantizer, or row lengths the type cannot block: one-line errors."""
    if type_name not in all_types():
        raise UserError(f"unknown type '{type_name}'; valid types: {', '.join(all_types())}")
    if type_name not in available_types():
        raise UserError(
            f"type '{type_name}' needs llama.cpp's quantizer: pip install llama-cpp-python "
            f"(available now: {', '.join(available_types())})"
        )
    bs = block_size(type_name)
    cfg = src.model
    # Row lengths of the 2-D weights: n_embd (embeddings, Q/K/V, gate/up), n_head*head_dim
    # (attention output) and ffn_hidden (down projection).
    rows = {"n_embd": cfg.n_embd, "n_head*head_dim": cfg.n_head * cfg.head_dim, "ffn_hidden": cfg.ffn_hidden}
    bad = {k: v for k, v in rows.items() if v % bs}
    if bad:
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise UserError(
            f"type '{type_name}' needs row lengths that are multiples of {bs}, but the model has {what}; "
            f"pick f16/bf16/q8_0 or train with multiples of {bs}"
        )


def gguf_rows(t: Tensor, arr: np.ndarray) -> np.ndarray:
    """A weight as llama.cpp stores it: Q and K rows permuted to its interleaved RoPE layout."""
    return permute_rotate_half(arr, t.rope_heads) if t.rope_heads else arr


SOURCE_RUN_KEY = "bulba.source_run"  # the MLflow run id of the training run behind the weights


def chat_template(tok) -> str:
    """The Llama-3 chat template (Jinja, from bulba.data.chat), ending turns with <|eot_id|> or,
    without it, EOS."""
    from bulba.data.chat import jinja_template

    return jinja_template(tok.end_of_turn)


def eos_id(src: Source) -> int:
    """The GGUF's EOS: <|eot_id|> for a model trained on conversations (as Llama-3-Instruct),
    so every tool that stops at EOS stops at the end of the assistant's turn; else the
    tokenizer's <|end_of_text|>."""
    tok = src.tokenizer
    return tok.eot_id if src.config.get("chat") and tok.eot_id is not None else tok.eos_id


def add_metadata(w, src: Source, file_type: int, name: str, quantized: bool) -> None:
    import gguf

    cfg, tok = src.model, src.tokenizer
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(int(file_type))
    if quantized:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # Every hyperparameter llama.cpp's llama loader reads (defaults there are Llama-2's).
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.ctx_len)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_rope_dimension_count(cfg.head_dim)
    # Tokenizer: byte-level BPE ("gpt2") with the Llama-3 pre-tokenizer regex.
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok.pre)  # "llama-bpe": the Llama-3 regex (bulba.data.tokenizer)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    w.add_token_merges(tok.merges)
    w.add_bos_token_id(tok.bos_id)  # the gpt2 default BOS would be token 11
    w.add_eos_token_id(eos_id(src))
    if tok.pad_id is not None:
        w.add_pad_token_id(tok.pad_id)
    if tok.eot_id is not None:
        w.add_eot_token_id(tok.eot_id)  # llama.cpp's end of generation, also for base models' chats
    w.add_add_bos_token(tok.add_bos)  # training data starts every document with BOS
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template(tok))
    if src.mlflow_run_id:  # lineage: eval.py logs a GGUF's figures on the run that trained it
        w.add_string(SOURCE_RUN_KEY, src.mlflow_run_id)


def convert(arr: np.ndarray, qtype) -> np.ndarray:
    """float32 [rows, cols] -> bytes of `qtype`, a few MB of rows at a time (bounded temporaries)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == Q.F16:
        return arr.astype(np.float16)
    out = np.empty(gguf.quant_shape_to_byte_shape(arr.shape, qtype), dtype=np.uint8)
    step = max(1, (4 << 20) // arr.shape[-1])
    for r in range(0, arr.shape[0], step):
        out[r : r + step] = gguf.quants.quantize(arr[r : r + step], qtype)
    return out


def _nbytes(shape, qtype) -> int:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return int(np.prod(shape)) * 4
    if qtype == gguf.GGMLQuantizationType.F16:
        return int(np.prod(shape)) * 2
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))


def write_gguf(src: Source, type_name: str, path: str | os.PathLike, name: str) -> dict:
    """Write `src` as a numpy-quantizable type to `path` (the caller makes it atomic)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype, ftype = numpy_types()[type_name]
    plan = layout(src.model)  # nothing beyond what llama.cpp loads
    dtypes = {}
    w = gguf.GGUFWriter(path, "llama")
    for t in plan:
        # Norm vectors stay F32 (as llama.cpp's converter and quantizer keep them).
        dtypes[t.gguf] = qtype if len(t.shape) == 2 else Q.F32
        w.add_tensor_info(
            t.gguf, t.shape, np.dtype(np.float32), _nbytes(t.shape, dtypes[t.gguf]), raw_dtype=dtypes[t.gguf]
        )
    add_metadata(w, src, ftype, name, quantized=qtype not in (Q.F32, Q.F16, Q.BF16))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in plan:
            arr = gguf_rows(t, src.read_tensor(t.name))
            w.write_tensor_data(convert(arr, dtypes[t.gguf]))
            del arr
        w.flush()
        for f in w.fout or []:
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(Exception):
            w.close()
    return {"tensors": len(plan), "file_type": int(ftype)}


def quantize_with_llama_cpp(f32_path: str | os.PathLike, out_path: str | os.PathLike, type_name: str) -> None:
    """K-quant mixes (q4_k_m, ...) by llama.cpp's llama_model_quantize, from our F32 file."""
    from bulba.export.llamacpp import quantize

    quantize(Path(f32_path), Path(out_path), LLAMA_CPP_TYPES[type_name])


def read_back(path: str | os.PathLike) -> dict:
    """Metadata and tensor names of a GGUF (for tests and the registry's tags)."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError, struct errors, IndexError... on bad bytes
        msg = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {msg}); re-export it") from None
    kv = {}
    for k, f in r.fields.items():
        with contextlib.suppress(Exception):
            kv[k] = f.contents()
    return {"kv": kv, "tensors": {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in r.tensors}}

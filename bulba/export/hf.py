"""A HuggingFace `LlamaForCausalLM` folder (`--hf-out DIR`) for transformers, vLLM, text-generation-webui.

Our weights already use HF's rotate-half RoPE layout, so this is renaming only (no Q/K
permutation, unlike GGUF). Tied embeddings: no lm_head.weight (transformers ties it back
from `tie_word_embeddings`). The tokenizer.json is the training one; tokenizer_config.json
names BOS/EOS/PAD and carries the same Llama-3 chat template as the GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

from bulba.atomic import atomic_dir
from bulba.errors import UserError
from bulba.export.gguf import chat_template
from bulba.export.source import Source
from bulba.model.weights import hf_name

HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def hf_config(src: Source, dtype: str) -> dict:
    cfg, tok = src.model, src.tokenizer
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.ctx_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers >= 5
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }


def tokenizer_config(src: Source) -> dict:
    tok = src.tokenizer
    added = {
        str(i): {
            "content": tok.tokens[i],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i in sorted(tok.special.values())
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos,
        "eos_token": tok.eos,
        "pad_token": tok.tokens[tok.pad_id] if tok.pad_id is not None else None,
        "add_bos_token": tok.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": src.model.ctx_len,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": chat_template(tok),
        "added_tokens_decoder": added,
    }


def _tokenizer_json(src: Source) -> str:
    """The training tokenizer, with BOS added by its post-processor when add_bos_token says so.

    PreTrainedTokenizerFast adds special tokens only through the post-processor; the
    training tokenizer has one already (bulba.data.tokenizer), older ones may not.
    """
    tj = json.loads(src.tokenizer_path.read_text(encoding="utf-8"))
    if src.tokenizer.add_bos and not tj.get("post_processor"):
        bos = src.tokenizer.bos
        tj["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [src.tokenizer.bos_id], "tokens": [bos]}},
        }
    return json.dumps(tj, ensure_ascii=False)


def write_hf(src: Source, out_dir: str | Path, dtype: str = "f32", force: bool = False) -> Path:
    """Write the folder atomically (built under a temporary name, renamed when complete)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if dtype not in HF_DTYPES:
        raise UserError(f"unknown --hf-dtype '{dtype}'; valid: {', '.join(HF_DTYPES)}")
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} exists; pass --force to replace it")
    tdtype = getattr(torch, HF_DTYPES[dtype])
    with atomic_dir(out_dir) as tmp:
        state = {}
        # The HF folder is small next to the GGUF work; one in-memory copy at the target
        # dtype is the price of safetensors' single-call writer.
        with safe_open(str(src.weights), framework="pt") as f:
            for name in src.shapes:
                t = f.get_tensor(name)
                if not torch.isfinite(t).all():
                    raise UserError(f"{src.weights}: weight '{name}' has NaN/Inf values")
                state[hf_name(name)] = t.to(tdtype).contiguous()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del state
        (tmp / "config.json").write_text(json.dumps(hf_config(src, HF_DTYPES[dtype]), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(
                {
                    "bos_token_id": src.tokenizer.bos_id,
                    "eos_token_id": [i for i in (src.tokenizer.eos_id, src.tokenizer.eot_id) if i is not None],
                    "pad_token_id": src.tokenizer.pad_id,
                    "do_sample": True,
                    "temperature": 0.8,
                    "top_p": 0.95,
                    "max_length": src.model.ctx_len,
                },
                indent=2,
            )
            + "\n"
        )
        (tmp / "tokenizer.json").write_text(_tokenizer_json(src), encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(src), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tmp / "special_tokens_map.json").write_text(
            json.dumps(
                {
                    "bos_token": src.tokenizer.bos,
                    "eos_token": src.tokenizer.eos,
                    **(
                        {"pad_token": src.tokenizer.tokens[src.tokenizer.pad_id]}
                        if src.tokenizer.pad_id is not None
                        else {}
                    ),
                },
                ensure_ascii=False,
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    return out_dir


def hf_logits(hf_dir: str | Path, input_ids):
    """Logits of the exported folder through transformers (for the parity check)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep export.py's output to its one-line verdicts
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(input_ids)[None]).logits[0].float()

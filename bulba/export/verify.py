"""Does the GGUF behave in llama.cpp as the model did in PyTorch?

On a mixed Russian / Belarusian / English / code sample (the project's own text):
- tokenization: llama.cpp's ids equal HF tokenizers' ids, every one (BOS included);
- f32: per position, max |logit difference| <= 1e-3 x that position's logit scale
  (max |logit| of the PyTorch row), and the greedy 32-token continuation is identical;
- f16 / bf16: the top-1 token agrees on >= 99% of positions;
- chat: for a few conversations (system / user / assistant turns, be / ru / en), the tokens
  llama.cpp builds from the messages with the file's template (its own formatter,
  `llama_chat_apply_template`, and the Jinja template as llama-cpp-python runs it) equal the ones
  training used (bulba.data.chat), with and without the generation prompt; for a model trained
  on conversations, the greedy reply to each ends with <|eot_id|> (llama.cpp stops there);
- quantized types (q8_0 and 4-6 bit): their rounding alone moves a small model's near-tied
  top-1s (a tiny model trained a few steps lost 8% top-1 to q4_0 in PyTorch itself; `tiny`
  after its 15-minute run lost 2.6% to q8_0 in PyTorch, every flip at a top-1 lead of 0.0004
  to 0.10 logits where the median lead is 0.51, while the sample's loss moved 0.01%), so the bar there is
  file fidelity: PyTorch running the GGUF's own dequantized weights and llama.cpp agree on
  top-1 for >= 95% of positions (llama.cpp also rounds activations to 8 bits for these
  types: the same q8_0 file, 98.1%). A wrong layout or metadata gives near-chance agreement. Figures against the
  original weights are reported for every type.
llama.cpp runs with an F32 K/V cache and no flash attention (see bulba.export.llamacpp), so the
figures measure the weights' format only.
"""

from __future__ import annotations

import time
import unicodedata
from dataclasses import asdict, dataclass, field

import numpy as np

SAMPLE = unicodedata.normalize(
    "NFC",
    (
        "Учора вечарам мы доўга гулялі па набярэжнай Свіслачы і гаварылі пра тое, "
        "як навучыць маленькую мадэль разумець адразу некалькі моў.\n"
        "Вчера вечером мы долго гуляли по набережной и спорили, сколько шагов обучения "
        "нужно крошечной модели, чтобы она заговорила по-белорусски.\n"
        "The export check compares every logit that llama.cpp computes with the PyTorch "
        "reference, position by position, in 2026 as in 1999.\n"
        "def mean(xs: list[float]) -> float:\n"
        "    return sum(xs) / len(xs) if xs else 0.0\n"
    ),
)

# Our own text; the leading space and trailing newline are there to be trimmed alike by all.
SAMPLE_CHATS = [
    [
        {"role": "system", "content": "Ты — ветлівы памочнік. Адказвай коратка."},
        {"role": "user", "content": " Колькі дзён у тыдні?"},
        {"role": "assistant", "content": "У тыдні сем дзён.\n"},
    ],
    [
        {"role": "user", "content": "Привет! Что приготовить на ужин?"},
        {"role": "assistant", "content": "Можно сварить суп."},
        {"role": "user", "content": "А на завтрак?"},
        {"role": "assistant", "content": "Кашу или омлет."},
    ],
    [
        {"role": "user", "content": "What color is the sky in the day?"},
        {"role": "assistant", "content": "It is usually blue."},
    ],
]
REPLY_TOKENS = 64  # a chat model's greedy reply must end its turn within this many tokens

REL_LOGIT_TOL = 1e-3  # f32: max |diff| / logit scale, on every position
TOP1_BAR = {"f16": 0.99, "bf16": 0.99}
FIDELITY_TOP1_BAR = 0.95  # quantized types: llama.cpp vs PyTorch on the dequantized file
GREEDY_TOKENS = 32
GREEDY_PROMPT = 16


@dataclass
class Report:
    type: str
    tokens_match: bool = False
    first_token_mismatch: int | None = None
    n_tokens: int = 0
    n_positions: int = 0
    logit_scale: float = 0.0
    max_abs_logit_diff: float = float("nan")
    max_rel_logit_diff: float = float("nan")
    top1_agreement: float = float("nan")
    fidelity_top1: float | None = None  # quantized: llama.cpp vs PyTorch with the file's own weights
    fidelity_max_rel_diff: float | None = None
    greedy_match: bool | None = None
    greedy_tokens: int = 0
    chat_tokens_match: bool | None = None  # None: the tokenizer has no chat tokens
    chat_conversations: int = 0
    chat_replies_stopped: int | None = None  # chat runs: greedy replies that ended with <|eot_id|>
    seconds: float = 0.0
    passed: bool = False
    verdict: str = ""
    problems: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Numeric figures for MLflow."""
        out = {}
        for k, v in asdict(self).items():
            if isinstance(v, bool):
                out[k] = float(v)
            elif isinstance(v, (int, float)) and not (isinstance(v, float) and np.isnan(v)):
                out[k] = float(v)
        return out


def reference_ids(tokenizer_path, text: str, bos_id: int, add_bos: bool) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    ids = tok.encode(text, add_special_tokens=False).ids
    return ([bos_id] if add_bos else []) + ids


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict:
    """ref/got [T, V] -> max abs diff, max per-position relative diff, top-1 agreement."""
    diff = np.abs(ref - got).max(axis=1)
    scale = np.abs(ref).max(axis=1)
    rel = diff / np.maximum(scale, 1e-12)
    return {
        "max_abs_logit_diff": float(diff.max()),
        "max_rel_logit_diff": float(rel.max()),
        "logit_scale": float(scale.max()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
    }


def verify_gguf(gguf_path, src, type_name: str, model=None, text: str = SAMPLE) -> Report:
    """Run the checks; `model` is the PyTorch reference (loaded from `src` when None)."""
    import torch

    from bulba.export.llamacpp import LlamaCpp
    from bulba.export.source import load_torch_model

    t0 = time.perf_counter()
    rep = Report(type=type_name)
    cfg, tok = src.model, src.tokenizer
    model = model if model is not None else load_torch_model(src)
    ref_ids = reference_ids(src.tokenizer_path, text, tok.bos_id, tok.add_bos)
    n_ctx = min(cfg.ctx_len, max(len(ref_ids), GREEDY_PROMPT + GREEDY_TOKENS, 256))
    with LlamaCpp(gguf_path, n_ctx=n_ctx) as llm:
        cpp_ids = llm.tokenize(text, add_special=True, parse_special=False)
        rep.tokens_match = cpp_ids == ref_ids
        rep.n_tokens = len(ref_ids)
        if not rep.tokens_match:
            rep.first_token_mismatch = next(
                (i for i, (a, b) in enumerate(zip(ref_ids, cpp_ids)) if a != b), min(len(ref_ids), len(cpp_ids))
            )
            rep.problems.append(
                f"tokenization differs from position {rep.first_token_mismatch} "
                f"({len(cpp_ids)} llama.cpp ids vs {len(ref_ids)} HF ids)"
            )
        ids = ref_ids[:n_ctx]  # same ids into both models, so logits compare even if tokenizers differ
        rep.n_positions = len(ids)
        with torch.no_grad():
            ref = model(torch.tensor([ids]))[0].float().numpy()
        got = llm.logits(ids)
        for k, v in compare_logits(ref, got).items():
            setattr(rep, k, v)
        if type_name == "f32" or type_name in TOP1_BAR:
            prompt = ids[:GREEDY_PROMPT]
            with torch.no_grad():
                ref_gen = model.generate(torch.tensor([prompt]), GREEDY_TOKENS)[0, len(prompt) :].tolist()
            cpp_gen = llm.greedy(prompt, GREEDY_TOKENS)
            rep.greedy_tokens = next((i for i, (a, b) in enumerate(zip(ref_gen, cpp_gen)) if a != b), GREEDY_TOKENS)
            rep.greedy_match = ref_gen == cpp_gen
        if tok.eot_id is not None and {"<|start_header_id|>", "<|end_header_id|>"} <= set(tok.special):
            check_chat(llm, src, rep)
    if type_name != "f32" and type_name not in TOP1_BAR:
        deq = dequantized_model(gguf_path, src)
        with torch.no_grad():
            ref_q = deq(torch.tensor([ids]))[0].float().numpy()
        del deq
        fid = compare_logits(ref_q, got)
        rep.fidelity_top1, rep.fidelity_max_rel_diff = fid["top1_agreement"], fid["max_rel_logit_diff"]
    if not np.isfinite(got).all():
        rep.problems.append("llama.cpp produced NaN/Inf logits")
    if type_name == "f32":
        if not rep.max_rel_logit_diff <= REL_LOGIT_TOL:
            rep.problems.append(
                f"max logit difference {rep.max_rel_logit_diff:.2e} of the logit scale > {REL_LOGIT_TOL:g}"
            )
        if not rep.greedy_match:
            rep.problems.append(f"greedy continuation diverges at token {rep.greedy_tokens} of {GREEDY_TOKENS}")
    elif type_name in TOP1_BAR:
        if not rep.top1_agreement >= TOP1_BAR[type_name]:
            rep.problems.append(f"top-1 agreement {rep.top1_agreement:.1%} < {TOP1_BAR[type_name]:.0%}")
    elif not rep.fidelity_top1 >= FIDELITY_TOP1_BAR:
        rep.problems.append(
            f"top-1 agreement with the file's own (dequantized) weights "
            f"{rep.fidelity_top1:.1%} < {FIDELITY_TOP1_BAR:.0%}"
        )
    rep.passed = not rep.problems
    rep.seconds = time.perf_counter() - t0
    rep.verdict = verdict_line(rep)
    return rep


def check_chat(llm, src, rep: Report, chats: list[list[dict]] = SAMPLE_CHATS) -> None:
    """Template tokens: llama.cpp (native formatter and Jinja) vs bulba.data.chat; for chat runs
    the greedy replies end with <|eot_id|>."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from tokenizers import Tokenizer

    from bulba.data.chat import ChatEncoder, parse, render

    tok = src.tokenizer
    enc = ChatEncoder(Tokenizer.from_file(str(src.tokenizer_path)), str(src.tokenizer_path))
    template = llm.chat_template()
    chat_run = bool(src.config.get("chat"))
    bad, stopped = [], 0
    for i, conv in enumerate(chats):
        msgs = parse({"messages": conv})
        ours = enc.encode(msgs)[0].tolist()
        ours_prompt = enc.tok.encode(render(msgs[:-1], add_generation_prompt=True), add_special_tokens=False).ids
        for what, add_ass, want, turns in (
            ("conversation", False, ours, conv),
            ("prompt", True, ours_prompt, conv[:-1]),
        ):
            native = llm.tokenize(llm.apply_chat_template(turns, add_ass), add_special=True, parse_special=True)
            fmt = Jinja2ChatFormatter(template, eos_token=tok.eos, bos_token=tok.bos, add_generation_prompt=add_ass)
            jinja = llm.tokenize(fmt(messages=turns).prompt, add_special=False, parse_special=True)
            for name, got in (("llama_chat_apply_template", native), ("the Jinja template", jinja)):
                if got != want:
                    at = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
                    bad.append(f"chat {i} {what}: {name} differs from training at token {at}")
        if chat_run:
            reply = llm.reply(ours_prompt, min(REPLY_TOKENS, llm.n_ctx - len(ours_prompt)))
            stopped += bool(reply) and reply[-1] == tok.eot_id
    rep.chat_conversations = len(chats)
    rep.chat_tokens_match = not bad
    rep.problems.extend(bad[:3])
    if chat_run:
        rep.chat_replies_stopped = stopped
        if stopped < len(chats):
            rep.problems.append(
                f"greedy replies ended their turn with <|eot_id|> in {stopped} of {len(chats)} chats "
                f"(within {REPLY_TOKENS} tokens): train the chat model longer"
            )


def dequantized_model(gguf_path, src):
    """The PyTorch model with the weights as stored in the GGUF (dequantized, Q/K un-permuted)."""
    import gguf
    import torch

    from bulba.export.source import load_torch_model
    from bulba.model.weights import by_gguf_name, unpermute_rotate_half

    to_ours = by_gguf_name(src.model)
    state = {}
    for g in gguf.GGUFReader(str(gguf_path)).tensors:
        w = gguf.quants.dequantize(g.data, g.tensor_type).reshape([int(x) for x in reversed(g.shape)])
        ours = to_ours[g.name]
        if ours.rope_heads:
            w = unpermute_rotate_half(w, ours.rope_heads)
        state[ours.name] = torch.tensor(np.asarray(w, dtype=np.float32))  # a copy: reader data is read-only
    model = load_torch_model(src)
    model.load_state_dict(state, strict=True)
    return model


def verdict_line(rep: Report) -> str:
    figures = (
        f"tokens {'identical' if rep.tokens_match else 'DIFFER'} ({rep.n_tokens}), {rep.n_positions} positions: "
        f"max |dlogit| {rep.max_abs_logit_diff:.3g} ({rep.max_rel_logit_diff:.2e} of scale {rep.logit_scale:.3g}), "
        f"top-1 {rep.top1_agreement:.1%}"
    )
    if rep.greedy_match is not None:
        figures += f", greedy {rep.greedy_tokens}/{GREEDY_TOKENS}"
    if rep.chat_tokens_match is not None:
        figures += (
            f", chat template tokens {'identical' if rep.chat_tokens_match else 'DIFFER'} ({rep.chat_conversations})"
        )
    if rep.chat_replies_stopped is not None:
        figures += f", replies stopped at <|eot_id|> {rep.chat_replies_stopped}/{rep.chat_conversations}"
    if rep.fidelity_top1 is not None:
        figures += f"; vs its dequantized weights: top-1 {rep.fidelity_top1:.1%}"
    head = "PASS" if rep.passed else "FAIL"
    tail = "" if rep.passed else " -- " + "; ".join(rep.problems)
    return f"verify {rep.type} in llama.cpp: {head}: {figures}{tail}"


def verify_hf(hf_dir, src, model=None, text: str = SAMPLE, dtype: str = "f32") -> dict:
    """The HF folder through transformers vs PyTorch: logits and tokenizer ids.

    f32 folders must match to REL_LOGIT_TOL; f16/bf16 ones by top-1 (as their GGUF twins).
    """
    import torch
    from transformers import AutoTokenizer

    from bulba.export.hf import hf_logits
    from bulba.export.source import load_torch_model

    model = model if model is not None else load_torch_model(src)
    ids = reference_ids(src.tokenizer_path, text, src.tokenizer.bos_id, src.tokenizer.add_bos)[: src.model.ctx_len]
    hf_ids = AutoTokenizer.from_pretrained(str(hf_dir))(text, truncation=True, max_length=src.model.ctx_len)[
        "input_ids"
    ]
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].float().numpy()
    got = hf_logits(hf_dir, ids).numpy()
    out = compare_logits(ref, got)
    out["tokens_match"] = hf_ids == ids
    close = out["max_rel_logit_diff"] <= REL_LOGIT_TOL if dtype == "f32" else out["top1_agreement"] >= TOP1_BAR[dtype]
    out["passed"] = bool(out["tokens_match"] and close)
    return out

"""The tokenizer as GGUF and HF need it: tokens in id order, merges, special ids, llama.cpp's
pre-tokenizer name; read from the run's tokenizer.json and checked against the model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bulba.errors import UserError


@dataclass
class TokenizerInfo:
    """The tokenizer as GGUF and HF need it: tokens in id order, merges, special ids."""

    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]  # "a b", byte-level symbols
    special: dict[str, int]  # content -> id of every special (control) token
    bos_id: int
    eos_id: int
    pad_id: int | None
    add_bos: bool
    eot_id: int | None  # <|eot_id|> when the tokenizer has it (chat models)
    pre: str = "llama-bpe"  # llama.cpp's name for the pre-tokenizer regex

    @property
    def bos(self) -> str:
        return self.tokens[self.bos_id]

    @property
    def eos(self) -> str:
        return self.tokens[self.eos_id]

    @property
    def end_of_turn(self) -> str:
        return self.tokens[self.eot_id if self.eot_id is not None else self.eos_id]


def load_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def read_tokenizer(path: Path, tok_cfg: dict, vocab_size: int) -> TokenizerInfo:
    """Tokens by id from an HF byte-level BPE tokenizer.json, checked against the model."""
    tj = load_json(path, "the run's tokenizer (written by train.py beside final.safetensors)")
    if not isinstance(tj, dict):
        raise UserError(f"{path} is not a tokenizer.json (expected a JSON object)")
    if not isinstance(tok_cfg, dict):
        raise UserError(f"config.json beside {path}: 'tokenizer' must be an object with bos_id/eos_id, got {tok_cfg!r}")
    try:
        return _read_tokenizer(path, tj, tok_cfg, vocab_size)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, OverflowError) as e:  # hand-edited/foreign
        raise UserError(
            f"{path} (or config.json's tokenizer ids) is malformed ({type(e).__name__}: "
            f"{str(e)[:120]}); use the tokenizer.json that train.py wrote"
        ) from None


def _read_tokenizer(path: Path, tj: dict, tok_cfg: dict, vocab_size: int) -> TokenizerInfo:
    import gguf

    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{path}: expected a byte-level BPE tokenizer (model.type BPE), got {model.get('type')!r}")
    by_id: dict[int, str] = {}
    dup: list[str] = []

    def put(tok_id: int, content: str):
        if tok_id in by_id and by_id[tok_id] != content:
            dup.append(f"id {tok_id} is both {by_id[tok_id]!r} and {content!r}")
        by_id[tok_id] = content

    for content, tok_id in model["vocab"].items():
        put(int(tok_id), content)
    special: dict[str, int] = {}
    user: set[int] = set()
    for at in tj.get("added_tokens") or []:
        put(int(at["id"]), at["content"])
        (special.__setitem__(at["content"], int(at["id"])) if at.get("special") else user.add(int(at["id"])))
    if dup:
        raise UserError(f"{path}: conflicting tokens: {dup[0]}")
    n = len(by_id)
    if sorted(by_id) != list(range(n)):
        missing = [i for i in range(n) if i not in by_id][:5]  # some id below n is missing (n <= the file)
        raise UserError(f"{path}: token ids are not contiguous (missing e.g. {missing})")
    if n != vocab_size:
        raise UserError(
            f"{path} has {n} tokens but the model's vocab_size is {vocab_size}: "
            "config/weights and tokenizer do not belong together (llama.cpp needs them equal)"
        )
    tokens = [by_id[i] for i in range(n)]
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:  # a duplicate token aborts llama.cpp's loader
            raise UserError(
                f"{path}: token {t!r} appears twice (ids {seen[t]} and {i}); llama.cpp refuses duplicate tokens"
            )
        seen[t] = i
    types = [int(gguf.TokenType.NORMAL)] * n
    for i in user:
        types[i] = int(gguf.TokenType.USER_DEFINED)
    for i in special.values():
        types[i] = int(gguf.TokenType.CONTROL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    def ident(key: str, default_names: tuple[str, ...]) -> int | None:
        v = tok_cfg.get(key)
        if v is None:
            v = next((special[s] for s in default_names if s in special), None)
        if v is not None and not (0 <= int(v) < n):
            raise UserError(f"config.json tokenizer.{key}={v} is outside the vocabulary (0..{n - 1})")
        return None if v is None else int(v)

    bos = ident("bos_id", ("<|begin_of_text|>", "<s>"))
    eos = ident("eos_id", ("<|end_of_text|>", "</s>"))
    if bos is None or eos is None:
        raise UserError(
            f"config.json has no tokenizer.bos_id/eos_id and {path} has no <|begin_of_text|>/<|end_of_text|>"
        )
    pad = ident("pad_id", ())
    return TokenizerInfo(
        pre=_pre_tokenizer_name(tj.get("pre_tokenizer"), path),
        tokens=tokens,
        token_types=types,
        merges=merges,
        special=special,
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        add_bos=bool(tok_cfg.get("add_bos_token", True)),
        eot_id=special.get("<|eot_id|>"),
    )


def _pre_tokenizer_name(pre: dict | None, path: Path) -> str:
    """llama.cpp applies its own regex, chosen by name: map the tokenizer's to that name.

    bulba.data.tokenizer writes Split(Llama-3 regex) + ByteLevel(use_regex=false): "llama-bpe".
    A plain ByteLevel(use_regex=true) is GPT-2's regex: "gpt-2". Anything else would
    tokenize differently in llama.cpp, so it is refused here rather than shipped.
    """
    from bulba.data.tokenizer import LLAMA3_PATTERN

    def flat(p):
        if not p:
            return []
        return sum((flat(x) for x in p["pretokenizers"]), []) if p.get("type") == "Sequence" else [p]

    steps = flat(pre)
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp spells this pre-tokenizer with a dash
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == LLAMA3_PATTERN:
            return "llama-bpe"
    raise UserError(
        f"{path}: pre-tokenizer {kinds} is not one llama.cpp reproduces; "
        "train the tokenizer with prepare.py (Llama-3 regex)"
    )

"""Conversations: reading, validating, the Llama-3 chat template and the loss mask.

The one home of the chat template's text. Training data (`prepare.py --format chat`), the GGUF's
`tokenizer.chat_template` (Jinja), the Ollama Modelfile's `TEMPLATE` (Go) and export's
verification all come from here, so what the model is trained on and what llama.cpp, LM Studio
and Ollama build from a user's messages are the same tokens.

A conversation renders as (Llama-3, BOS first, no EOS: a turn ends with <|eot_id|>):

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{content}<|eot_id|> ...

`content` is NFC-normalized and stripped (llama.cpp and the Jinja template both trim it, so
a stripped content is the same string in all three). The loss mask is 1 on the tokens of the
assistant contents and on the <|eot_id|> closing each of them, 0 elsewhere (BOS, headers,
the "\\n\\n" after a header, system and user turns): the model learns to answer and to end its
turn, not to write the user's side.

Inputs (one record per conversation): JSON Lines, JSON (a list), Parquet, or a local `datasets`
folder, with a list of `{"role", "content"}` under `messages` (or `--messages-field`), or
ShareGPT's `conversations` list of `{"from", "value"}` (human / gpt / system).

Bad conversations are never dropped silently: each kind is counted, and the first few are named
with their file and line (`Problems`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from bulba.data.corpus.readers import _json_records, _load_hf, nfc
from bulba.data.corpus.sources import Input
from bulba.data.tokenizer import BOS, END_HEADER, EOT, START_HEADER
from bulba.errors import UserError

ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names -> roles (and the roles themselves, which some exports use).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_FIELD = "conversations"
DEFAULT_FIELD = "messages"

# Kinds of bad conversations, in the order the report lists them.
KINDS = {
    "malformed": "not a list of {role, content} messages",
    "unknown_role": "a role other than system, user, assistant",
    "empty": "no messages, or a message with empty content",
    "not_alternating": "not user/assistant turns in turn (after an optional system), ending with assistant",
    "special_text": "content that spells a special token",
    "too_long": "longer than --ctx-len tokens",
}
SHOW_FIRST = 3  # where the first few of each kind are


# ---------------------------------------------------------------------------- the template


def header(role: str) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


def render(messages: list[tuple[str, str]], add_generation_prompt: bool = False, bos: bool = True) -> str:
    """The conversation as template text (contents as given: `parse` has normalized them)."""
    text = (BOS if bos else "") + "".join(header(r) + c + EOT for r, c in messages)
    return text + (header("assistant") if add_generation_prompt else "")


def chat_prompt(user: str) -> str:
    """A one-turn prompt: the user's message and the assistant header (training samples)."""
    return render([("user", nfc(user).strip())], add_generation_prompt=True)


def jinja_template(eot: str = EOT) -> str:
    """The template as Jinja (GGUF `tokenizer.chat_template`, HF `chat_template`). llama.cpp
    recognizes it as its built-in "llama3" (it contains the header tokens); llama-cpp-python and
    LM Studio run the Jinja itself. `eot`: the turn end (EOS for a tokenizer without <|eot_id|>)."""
    return (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '"
        + START_HEADER
        + "' + message['role'] + '"
        + END_HEADER
        + "\\n\\n' + message['content'] | trim + '"
        + eot
        + "' }}"
        "{% endfor %}{% if add_generation_prompt %}"
        "{{ '" + header("assistant").replace("\n", "\\n") + "' }}{% endif %}"
    )


def ollama_template(eot: str = EOT) -> str:
    """The template in Ollama's Go-template form (Modelfile `TEMPLATE`); Ollama adds BOS itself."""
    return (
        "{{ if .System }}" + header("system") + "{{ .System }}" + eot + "{{ end }}"
        "{{ if .Prompt }}"
        + header("user")
        + "{{ .Prompt }}"
        + eot
        + "{{ end }}"
        + header("assistant")
        + "{{ .Response }}"
        + eot
    )


# ---------------------------------------------------------------------------- reading


class BadConversation(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def iter_records(src: Input) -> Iterator[tuple[object, str]]:
    """(record, where) for every record of a chat input; `where` is file:line (or row)."""
    if src.kind in ("json", "jsonl"):
        yield from _json_records(src.files[0])
    elif src.kind == "parquet":
        import pyarrow.parquet as pq

        path = src.files[0]
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        row = 0
        for rb in pf.iter_batches(batch_size=1024):
            for rec in rb.to_pylist():
                yield rec, f"{path}: row {row}"
                row += 1
    elif src.kind in ("hf-disk", "hf-hub"):
        row = 0
        for ds in _load_hf(src):
            for rec in ds:
                yield rec, f"{src.name}: row {row}"
                row += 1
    else:
        raise UserError(
            f"{src.name}: --format chat reads .jsonl, .json, .parquet or a datasets folder "
            f"(one conversation per record), not {src.kind} files"
        )


def parse(record, messages_field: str = DEFAULT_FIELD) -> list[tuple[str, str]]:
    """A record -> [(role, NFC stripped content)], validated; raises BadConversation."""
    if not isinstance(record, dict):
        raise BadConversation("malformed", f"a record must be an object, got {type(record).__name__}")
    if messages_field in record:
        items, sharegpt = record[messages_field], False
    elif SHAREGPT_FIELD in record:
        items, sharegpt = record[SHAREGPT_FIELD], True
    else:
        names = ", ".join(list(record)[:8]) or "none"
        raise BadConversation(
            "malformed", f"no field {messages_field!r} or {SHAREGPT_FIELD!r} (fields: {names}); see --messages-field"
        )
    if not isinstance(items, list):
        raise BadConversation("malformed", f"{messages_field!r} must be a list, got {type(items).__name__}")
    if not items:
        raise BadConversation("empty", "no messages")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise BadConversation("malformed", f"message {i} is {type(m).__name__}, not an object")
        # ShareGPT items inside a messages field are read too (some exports mix the two).
        if "from" in m or sharegpt:
            who, content = m.get("from"), m.get("value")
            role = SHAREGPT_ROLES.get(who) if isinstance(who, str) else None
            if role is None:
                raise BadConversation("unknown_role", f"message {i} is from {who!r} (human, gpt or system)")
        else:
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise BadConversation("unknown_role", f"message {i} has role {role!r} (system, user or assistant)")
        if not isinstance(content, str):
            if content is None:
                raise BadConversation("empty", f"message {i} ({role}) has no content")
            raise BadConversation("malformed", f"message {i} content is {type(content).__name__}, not text")
        content = nfc(content).strip()
        if not content:
            raise BadConversation("empty", f"message {i} ({role}) is empty")
        out.append((role, content))
    roles = [r for r, _ in out]
    turns = roles[1:] if roles[0] == "system" else roles
    want = ["user", "assistant"] * ((len(turns) + 1) // 2)
    if not turns or turns != want[: len(turns)] or turns[-1] != "assistant":
        raise BadConversation("not_alternating", f"roles {'/'.join(roles)}")
    return out


@dataclass
class Problems:
    """Bad conversations per kind, with where the first few are."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, where: str, detail: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        seen = self.first.setdefault(kind, [])
        if len(seen) < SHOW_FIRST:
            seen.append(f"{where}: {detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        out = []
        for kind in KINDS:
            if kind in self.counts:
                out.append(f"skipped {self.counts[kind]} conversation(s): {KINDS[kind]} ({kind}), e.g.")
                out.extend(f"  {w}" for w in self.first[kind])
        return out

    def as_dict(self) -> dict:
        return {k: {"count": self.counts[k], "first": self.first[k]} for k in KINDS if k in self.counts}


# ---------------------------------------------------------------------------- tokens and mask


class ChatEncoder:
    """Conversations -> (token ids, loss mask) with a pretraining run's tokenizer.

    The rendered text is tokenized in one piece with special tokens parsed, as llama.cpp
    tokenizes its template's output (`special=True`); the mask comes from the character spans
    of the assistant contents (token offsets). Header boundaries are token boundaries: the
    special tokens split the text, and the Llama-3 regex always makes "\\n\\n" before a
    non-space character a piece of its own.
    """

    def __init__(self, tokenizer, where: str = "the tokenizer"):
        self.tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in (BOS, START_HEADER, END_HEADER, EOT) if t not in vocab]
        if missing:
            raise UserError(
                f"{where} lacks the chat special token(s) {', '.join(missing)}: use the tokenizer.json of a "
                "dataset prepare.py made (it has them), so the ids are the base model's"
            )
        self.bos, self.eot = vocab[BOS], vocab[EOT]
        self.specials = sorted(t.content for t in tokenizer.get_added_tokens_decoder().values())

    def check_text(self, messages: list[tuple[str, str]]) -> None:
        for i, (role, c) in enumerate(messages):
            if "<|" in c:
                hit = next((s for s in self.specials if s in c), None)
                if hit is not None:
                    raise BadConversation("special_text", f"message {i} ({role}) contains {hit!r}")

    def encode(self, messages: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """(ids uint32, mask uint8) of one parsed conversation."""
        self.check_text(messages)
        text = render(messages)
        spans = []  # [start, end) of each assistant content and its <|eot_id|>, in characters
        pos = len(BOS)
        for role, c in messages:
            pos += len(header(role))
            if role == "assistant":
                spans.append((pos, pos + len(c) + len(EOT)))
            pos += len(c) + len(EOT)
        enc = self.tok.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.uint32)
        starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)
        ends = np.asarray([o[1] for o in enc.offsets], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for a, b in spans:
            inside = (starts >= a) & (starts < b)
            if ((starts < a) & (ends > a)).any():  # a token across the header/content boundary
                raise RuntimeError(f"a token crosses the start of an assistant turn in {text[:80]!r}")
            mask[inside] = 1
        if ids[0] != self.bos:  # the template's first token is BOS, parsed as a special token
            raise RuntimeError("the rendered conversation does not start with BOS")
        return ids, mask


def conversation_key(messages: list[tuple[str, str]]) -> bytes:
    """The bytes a conversation's train/val split is keyed on (its messages, canonical JSON)."""
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode()

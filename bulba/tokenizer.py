"""The tokenizer: byte-level BPE with the Llama-3 pre-tokenizer, trained with HF `tokenizers`.

Layout of the vocabulary (exactly `vocab_size` ids, every token string unique):

    0 .. n_bpe-1          256 byte tokens, then learned merges (BPE model)
    n_bpe .. V-len(SPECIAL)-1   <|reserved_special_token_i|>, only when the corpus was too
                          small to learn enough merges (keeps the size exact: the model's
                          embedding has exactly V rows and GGUF needs rows == tokens)
    V-5 .. V-1            SPECIAL_TOKENS, in that order (default V=32003: bos=32000, eos=32001)

The saved `tokenizer.json` is a complete Llama-3-style tokenizer: NFC normalizer, the Llama-3
split regex, byte-level mapping, BOS added by the post-processor (`add_bos_token = true`), and
the byte-level decoder, so `decode(encode(x)) == NFC(x)` for every string x that does not
itself spell a special token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .errors import UserError

# Llama-3's pre-tokenizer regex (from its tokenizer.json / tiktoken cl100k-style pattern).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
# Order chosen so the default vocabulary (32003) gives bos=32000, eos=32001 as in
# docs/contracts.md; readers must take the ids from meta.json, never assume them.
SPECIAL_TOKENS = [START_HEADER, END_HEADER, BOS, EOS, EOT]
N_BYTES = 256
MIN_VOCAB = N_BYTES + len(SPECIAL_TOKENS)
DEFAULT_VOCAB = 32003


def _pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: it must hold the {N_BYTES} byte tokens and "
            f"{len(SPECIAL_TOKENS)} special tokens, so at least {MIN_VOCAB}")
    if vocab_size > 2**32:
        raise UserError(f"--vocab-size {vocab_size} is too large (token ids are stored as uint32)")


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB, min_frequency: int = 2,
                    show_progress: bool = False, warn: Callable[[str], None] | None = None) -> Tokenizer:
    """Train on an iterator of NFC text (streamed: only pair counts are held in memory)."""
    check_vocab_size(vocab_size)
    n_bpe = vocab_size - len(SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE(ignore_merges=True))  # as Llama-3: whole-word tokens win
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=min_frequency,
        show_progress=show_progress,
        # The whole byte alphabet, seen or not: no text can ever produce an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    learned = tok.get_vocab_size(with_added_tokens=False)
    if learned < N_BYTES:  # cannot happen with initial_alphabet, but never write a broken file
        raise RuntimeError(f"BPE trainer returned {learned} tokens, fewer than the byte alphabet")
    n_reserved = n_bpe - learned
    if n_reserved and warn:
        warn(f"corpus too small to learn {n_bpe - N_BYTES} merges at min frequency {min_frequency}; "
             f"filled {n_reserved} ids with <|reserved_special_token_i|> to keep --vocab-size {vocab_size}")
    # Added tokens get ids after the model's vocabulary, in the order given.
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(n_reserved)] + SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    check_tokenizer(tok, vocab_size)
    return tok


def check_tokenizer(tok: Tokenizer, vocab_size: int | None = None) -> dict[str, int]:
    """Exact size, unique tokens, ids 0..V-1 dense, all special tokens present; returns them."""
    vocab = tok.get_vocab(with_added_tokens=True)
    size = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and size != vocab_size:
        raise UserError(f"tokenizer has {size} tokens, expected exactly {vocab_size}")
    if len(vocab) != size or sorted(vocab.values()) != list(range(size)):
        raise UserError("tokenizer vocabulary is not a dense set of unique tokens 0..V-1")
    specials = {}
    for t in SPECIAL_TOKENS:
        if t not in vocab:
            raise UserError(f"tokenizer lacks the special token {t}")
        specials[t] = vocab[t]
    return specials


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"cannot load tokenizer {path}: {str(e).splitlines()[0]}") from None
    check_tokenizer(tok)
    return tok


def encoder_for_documents(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` for writing token streams: `<|begin_of_text|> text <|end_of_text|>`.

    Differences from the saved tokenizer, none of which changes the ids:
    - no normalizer: prepare NFC-normalizes in Python first (a C fast path that is a no-op
      for text already in NFC), which spares the Rust side its per-byte alignment tracking;
    - special-token strings inside user text are encoded as plain text, so a document that
      happens to contain "<|eot_id|>" cannot inject a control token into training data;
    - the post-processor wraps each document in BOS ... EOS (the contract's document format).
    """
    d = json.loads(tok.to_str())
    d["normalizer"] = None
    d["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": EOS, "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {t: {"id": t, "ids": [tok.token_to_id(t)], "tokens": [t]} for t in (BOS, EOS)},
    }
    enc = Tokenizer.from_str(json.dumps(d))
    enc.encode_special_tokens = True
    return enc

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

from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from bulba.errors import UserError

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
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: it must hold the {N_BYTES} byte tokens and "
            f"{len(SPECIAL_TOKENS)} special tokens, so at least {MIN_VOCAB}"
        )
    if vocab_size > 2**32:
        raise UserError(f"--vocab-size {vocab_size} is too large (token ids are stored as uint32)")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB,
    min_frequency: int = 2,
    show_progress: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Tokenizer:
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
        warn(
            f"corpus too small to learn {n_bpe - N_BYTES} merges at min frequency {min_frequency}; "
            f"filled {n_reserved} ids with <|reserved_special_token_i|> to keep --vocab-size {vocab_size}"
        )
    # Added tokens get ids after the model's vocabulary, in the order given.
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(n_reserved)] + SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
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


def tokenizer_file(path: str | Path) -> Path:
    """`--tokenizer` as given: a tokenizer.json, or a prepared-data directory holding one."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"cannot load tokenizer {path}: {str(e).splitlines()[0]}") from None
    try:
        check_tokenizer(tok)
    except UserError as e:
        raise UserError(f"{path}: {e}; use a tokenizer.json that prepare.py wrote") from None
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
    return _as_document_encoder(Tokenizer.from_str(tok.to_str()))


def _as_document_encoder(enc: Tokenizer) -> Tokenizer:
    """Turn a fresh copy of the tokenizer into the document encoder, in place (no JSON
    round trip through Python objects: that alone would double the peak memory)."""
    enc.normalizer = None
    bos, eos = enc.token_to_id(BOS), enc.token_to_id(EOS)
    enc.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B:1 {EOS}:1", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    enc.encode_special_tokens = True
    return enc


# Probes for one character c: together they expose which class the regex puts c in (letter,
# number, whitespace, newline, other) and how it case-folds in the contractions.
_PROBES = (
    "a{c}b",
    " {c}{c}1",
    "'{c} {c}\n",
    "1{c}x  {c}",
    "{c}'S",
    "x'{c}",
    "'{c}e",
    "'r{c}",
    "'l{c}",
    "'v{c}",
    "\n{c}\n",
    "{c}\r\n ",
)


class DocumentEncoder:
    """Encodes NFC documents to `[BOS] ids [EOS]` lists, exactly as `encoder_for_documents`.

    HF `tokenizers` spends most of its time on per-piece bookkeeping (alignments, offsets,
    token strings, merging encodings) that a token stream never uses. Here the Llama-3
    regex runs in Python (`regex` module, C), each distinct piece is byte-mapped and
    BPE-encoded once by the Rust model (`model.tokenize`), and its ids are cached: natural
    text is Zipfian, so nearly every piece is a dictionary hit: 3-4x less CPU per MB than
    `encode_batch`. It is single-threaded; prepare runs one per worker process.

    Exactness: the Python `regex` module and the Oniguruma engine inside `tokenizers` can
    disagree on characters whose Unicode class changed between Unicode versions (a few
    thousand recently assigned letters). Every character is therefore probed once, the
    first time it appears, against `tokenizers`' own splitter; documents holding a character
    that splits differently (or when `regex` is missing) go through the Rust encoder.
    """

    def __init__(self, tok: Tokenizer | str, cache_size: int = 1 << 16, fast: bool = True):
        # From a JSON string, only the encoder is ever built (a 32k tokenizer is ~35 MB).
        if isinstance(tok, str):
            self.rust = _as_document_encoder(Tokenizer.from_str(tok))
        else:
            self.rust = encoder_for_documents(tok)
        self.bos, self.eos = self.rust.token_to_id(BOS), self.rust.token_to_id(EOS)
        self.cache_size = cache_size
        self.cache: dict[str, tuple[int, ...]] = {}
        self.known: set[str] = set()
        self.unsafe: set[str] = set()
        self._unsafe_re = None
        self.fast_docs = self.rust_docs = 0
        self.pattern = None
        if fast:
            import regex  # a dependency of the package: the stdlib `re` lacks \p{L} classes

            self.pattern = regex.compile(LLAMA3_PATTERN)
        if self.pattern is not None:
            self._model = self.rust.model
            self._split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
            b2u = _bytes_to_unicode()
            self._bytemap = {i: b2u[i] for i in range(256)}  # str.translate table for latin-1 text

    def _probe(self, chars: set[str]) -> None:
        import re

        split, findall = self._split.pre_tokenize_str, self.pattern.findall
        for c in chars:
            for probe in _PROBES:
                s = probe.replace("{c}", c)
                if findall(s) != [p for p, _ in split(s)]:
                    self.unsafe.add(c)
                    break
        self.known |= chars
        if self.unsafe:
            self._unsafe_re = re.compile("[" + "".join(re.escape(c) for c in sorted(self.unsafe)) + "]")

    def encode(self, docs: list[str]) -> list[list[int]]:
        if self.pattern is None:
            self.rust_docs += len(docs)
            return [e.ids for e in self.rust.encode_batch_fast(docs)]
        new = set("".join(docs)) - self.known
        if new:
            self._probe(new)
        if len(self.cache) > self.cache_size:
            self.cache.clear()  # bounded memory; the hot pieces come straight back
        one = self._encode_one
        if self._unsafe_re is None:
            out = [one(d) for d in docs]
            self.fast_docs += len(docs)
            return out
        unsafe = self._unsafe_re.search
        slow = [i for i, d in enumerate(docs) if unsafe(d)]
        out = [one(d) if not unsafe(d) else None for d in docs]
        for i, e in zip(slow, self.rust.encode_batch_fast([docs[i] for i in slow])):
            out[i] = e.ids
        self.rust_docs += len(slow)
        self.fast_docs += len(docs) - len(slow)
        return out

    def _encode_one(self, d: str) -> list[int]:
        pieces = self.pattern.findall(d)
        cache = self.cache
        ids = [self.bos]
        try:  # the common case: every piece is cached
            for p in pieces:
                ids += cache[p]
        except KeyError:
            tokenize, bytemap = self._model.tokenize, self._bytemap
            ids = [self.bos]
            for p in pieces:
                t = cache.get(p)
                if t is None:  # tuples: the cache is most of this process's memory
                    t = cache[p] = tuple([x.id for x in tokenize(p.encode().decode("latin-1").translate(bytemap))])
                ids += t
        ids.append(self.eos)
        return ids


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table, as the ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}

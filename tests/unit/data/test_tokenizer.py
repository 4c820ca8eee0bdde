"""The tokenizer: exact size, unique tokens, byte coverage, round trip on the real corpus."""

from __future__ import annotations

import unicodedata

import pytest
from tokenizers import Tokenizer

from bulba.data.tokenizer import (
    BOS,
    EOS,
    MIN_VOCAB,
    SPECIAL_TOKENS,
    encoder_for_documents,
    load_tokenizer,
    train_tokenizer,
)
from bulba.errors import UserError

SMALL_TEXT = [
    "The bison walks in the forest.",
    "Зубр ходзіць па пушчы.",
    "Зубр гуляет по лесу.",
    "def f(x):\n    return x + 1\n",
] * 20


def corpus_lines(corpus_dir, lang: str) -> list[str]:
    text = (corpus_dir / f"{lang}.txt").read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line]


@pytest.mark.parametrize("lang", ["be", "ru", "en"])
def test_round_trip_every_line(prepared_data, corpus_dir, lang):
    """decode(encode(x)) == NFC(x) for every line, with the saved tokenizer.json as shipped."""
    tok = Tokenizer.from_file(str(prepared_data / "tokenizer.json"))
    lines = corpus_lines(corpus_dir, lang)
    encs = tok.encode_batch(lines, add_special_tokens=False)
    decoded = tok.decode_batch([e.ids for e in encs], skip_special_tokens=False)
    bad = [(x, y) for x, y in zip(lines, decoded) if y != unicodedata.normalize("NFC", x)]
    assert not bad, f"{len(bad)} of {len(lines)} lines do not round-trip, e.g. {bad[0]!r}"


def test_round_trip_unseen_scripts_and_nfd():
    """Text the tokenizer never saw still round-trips (full byte alphabet), NFD arrives as NFC."""
    tok = train_tokenizer(iter(SMALL_TEXT), vocab_size=400)
    samples = [
        "中文 😀 ∑ ﬁ",
        "Ёлка, й",
        unicodedata.normalize("NFD", "Ёлка, й, ў, café"),
        "\t tabs  and\r\nnewlines\n\n",
        "\x00\x01 control",
        "ʼ’' apostrophes: з’ява",
    ]
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", s)
    assert tok.encode("x").ids[0] == tok.token_to_id(BOS)  # add_bos_token, as Llama-3


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB, 300, 1000])
def test_exact_vocab_size_unique_tokens(vocab_size):
    tok = train_tokenizer(iter(SMALL_TEXT), vocab_size=vocab_size)
    vocab = tok.get_vocab(with_added_tokens=True)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    assert len(vocab) == vocab_size and sorted(vocab.values()) == list(range(vocab_size))
    # special tokens occupy the last ids, in a fixed order
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(vocab_size - len(SPECIAL_TOKENS), vocab_size))


def test_default_layout_matches_contract():
    tok = train_tokenizer(iter(SMALL_TEXT), vocab_size=32003)  # tiny text: padded with reserved tokens
    assert tok.get_vocab_size() == 32003
    assert tok.token_to_id(BOS) == 32000 and tok.token_to_id(EOS) == 32001


def test_vocab_too_small():
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(iter(SMALL_TEXT), vocab_size=MIN_VOCAB - 1)


def test_llama3_pretokenizer():
    tok = train_tokenizer(iter(SMALL_TEXT), vocab_size=300)
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("Hello world's 12345!!\n\n  x")]
    assert pieces == ["Hello", "Ġworld", "'s", "Ġ", "123", "45", "!!ĊĊ", "Ġ", "Ġx"]


def test_document_encoder_same_ids(prepared_data, corpus_dir):
    """The encoder prepare uses (Python NFC, no Rust normalizer, BOS/EOS template) gives the
    shipped tokenizer's ids, and treats special-token text in a document as plain text."""
    tok = load_tokenizer(prepared_data / "tokenizer.json")
    enc = encoder_for_documents(tok)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    lines = [x for lang in ("be", "ru", "en") for x in corpus_lines(corpus_dir, lang)[::20]]
    lines += [unicodedata.normalize("NFD", "Ёлка ў лесе")]
    nfc = [unicodedata.normalize("NFC", x) for x in lines]
    got = [e.ids for e in enc.encode_batch_fast(nfc)]
    want = [[bos] + e.ids + [eos] for e in tok.encode_batch(lines, add_special_tokens=False)]
    assert got == want
    ids = enc.encode("a <|eot_id|> b").ids
    assert tok.token_to_id("<|eot_id|>") not in ids
    assert tok.decode(ids[1:-1], skip_special_tokens=False) == "a <|eot_id|> b"


@pytest.mark.parametrize("lang", ["be", "ru", "en"])
def test_cached_encoder_matches_tokenizers_every_line(prepared_data, corpus_dir, lang):
    """prepare's fast encoder (Python regex + id cache) writes exactly the ids that HF
    `tokenizers` gives, on every line of the real corpus."""
    from bulba.data.tokenizer import DocumentEncoder

    tok = load_tokenizer(prepared_data / "tokenizer.json")
    lines = [unicodedata.normalize("NFC", x) for x in corpus_lines(corpus_dir, lang)]
    fast = DocumentEncoder(tok, fast=True)
    got = [ids for i in range(0, len(lines), 5000) for ids in fast.encode(lines[i : i + 5000])]
    want = [e.ids for e in encoder_for_documents(tok).encode_batch_fast(lines)]
    assert got == want
    assert fast.fast_docs > 0.99 * len(lines)


def test_cached_encoder_unicode_sweep():
    """Every 61st code point, in contexts that expose how the regex classifies it: same ids as
    `tokenizers`. Characters the two regex engines classify differently (newer Unicode
    letters such as U+088F) are detected and routed to the Rust encoder."""
    from bulba.data.tokenizer import DocumentEncoder

    tok = train_tokenizer(iter(SMALL_TEXT), vocab_size=400)
    cps = [c for c in range(0, 0x110000, 61) if not 0xD800 <= c < 0xE000] + [0x88F, 0x17F, 0x212A, 0xFB05]
    docs = [
        unicodedata.normalize("NFC", f"a{chr(c)}b {chr(c)}{chr(c)}1 x'{chr(c)} 12{chr(c)}\n{chr(c)}  ") for c in cps
    ]
    enc = DocumentEncoder(tok, fast=True)
    assert enc.encode(docs) == [e.ids for e in encoder_for_documents(tok).encode_batch_fast(docs)]
    assert "\u088f" in enc.unsafe and enc.rust_docs >= 1

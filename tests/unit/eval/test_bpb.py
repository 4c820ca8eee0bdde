"""eval.py's windowing and text handling: every token scored exactly once, each window after
BOS within the context; NFC, whole lines under --max-kb, the xz floor, one-line errors."""

from __future__ import annotations

import lzma
import math
import unicodedata

import pytest

from bulba.errors import UserError
from bulba.eval.bpb import default_stride, read_text, windows, xz_bits_per_byte
from support.paths import REPO


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 1000, 4097])
@pytest.mark.parametrize("ctx,stride", [(2, 1), (64, 32), (64, 63), (64, 1), (256, 500)])
def test_windows_score_every_token_once_within_the_context(n, ctx, stride):
    wins = windows(n, ctx, stride)
    scored = [t for s, e, first in wins for t in range(first, e)]
    assert scored == list(range(n))  # each once, in order
    for s, e, first in wins:
        assert 1 + (e - s) <= ctx  # BOS + the text tokens fit the context
        assert s <= first < e
    # every token after the first window keeps at least ctx - 1 - stride tokens of context
    step = max(1, min(stride, ctx - 1))
    for s, e, first in wins[1:]:
        assert first - s >= ctx - 1 - step


def test_windows_refuse_a_context_without_room():
    with pytest.raises(UserError, match="too short"):
        windows(10, 1, 1)
    assert default_stride(256) == 128


def test_read_text_is_nfc_and_cut_at_whole_lines(tmp_path):
    p = tmp_path / "be.txt"
    decomposed = unicodedata.normalize("NFD", "Ён пайшоў дадому.\n") * 100  # ё, ў decomposed
    p.write_text(decomposed, encoding="utf-8")
    t = read_text(p)
    assert t.name == "be" and t.text == unicodedata.normalize("NFC", decomposed)
    cut = read_text(p, max_kb=0.1)
    assert len(cut.data) <= 100 and cut.text.endswith("\n") and cut.text in t.text
    one_line = tmp_path / "x.txt"
    one_line.write_text("ўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўўў", encoding="utf-8")
    assert read_text(one_line, max_kb=0.005).documents == ["ўў"]  # too long: whole characters (2 bytes each) + "\n"


def test_documents_are_those_prepare_writes(tmp_path):
    """eval.py cuts a file into documents by prepare's rule (bulba.data.corpus.readers): lines,
    or paragraphs when the file has a blank line; CRLF, outer spaces and empty lines dropped."""
    from bulba.data.corpus.readers import iter_documents
    from bulba.data.corpus.sources import resolve_inputs, scan_source

    lines = tmp_path / "lines.txt"
    lines.write_bytes("Першы сказ.\r\n  Другі сказ.  \r\nТрэці.".encode())
    paras = tmp_path / "paras.txt"
    paras.write_text("Адзін радок,\nдругі радок абзаца.\n\n\n  Другі абзац.\n \nТрэці\n", encoding="utf-8")
    for p, sep in ((lines, "\n"), (paras, "\n\n")):
        (src,), _ = resolve_inputs([str(p)])
        scan_source(src)
        prepared = [d for batch in iter_documents(src) for d in batch]
        t = read_text(p)
        assert t.documents == prepared and t.separator == sep, p.name
        assert t.text == "".join(d + sep for d in prepared)
    assert read_text(lines).documents == ["Першы сказ.", "Другі сказ.", "Трэці."]
    assert read_text(paras).documents == ["Адзін радок,\nдругі радок абзаца.", "Другі абзац.", "Трэці"]


class _Recorder:
    """A stand-in model for the windowing only: one token per character, every window recorded
    (the real PyTorch and llama.cpp models are scored in tests/integration/test_eval.py)."""

    kind, bos_id, end_id, ctx = "recorder", -1, -2, 8

    def __init__(self):
        self.windows = []

    def document_ids(self, doc):
        return [ord(c) for c in doc] + [self.end_id]

    def nll(self, work, advance):
        self.windows += work
        return float(sum(len(t) for _, _, t in work))  # 1 nat per scored token


def test_each_document_scored_from_bos_with_its_eos(tmp_path):
    from bulba.eval.bpb import evaluate

    p = tmp_path / "be.txt"
    docs = ["ab", "cdefghijklmnopqrstu", "v"]  # the middle one is longer than the context (8)
    p.write_text("\n".join(docs) + "\n", encoding="utf-8")
    m = _Recorder()
    (score,) = evaluate(m, [read_text(p)], progress=False)
    scored = []
    for inputs, first, targets in m.windows:
        assert inputs[0] == m.bos_id and len(inputs) <= m.ctx and -1 not in inputs[1:]
        assert 1 <= first + len(targets) <= len(inputs) and first >= 0
        # position first + i predicts targets[i]: the input just before it is its predecessor
        assert inputs[first + 1 : first + len(targets)] == targets[:-1]
        scored.append(targets)
    flat = [t for ts in scored for t in ts]
    assert flat == [t for d in docs for t in m.document_ids(d)]  # every token and EOS, once, in order
    assert score.tokens == len(flat) and score.bytes == len("".join(d + "\n" for d in docs))
    assert score.bits_per_byte == pytest.approx(len(flat) / math.log(2) / score.bytes)
    assert score.tokens_per_word == pytest.approx((len(flat) - 3) / 3)


@pytest.mark.parametrize(
    "content,needle",
    [(None, "does not exist"), (b"", "holds no text"), (b" \n\t\n", "holds no text"), (b"caf\xe9\n", "not UTF-8")],
)
def test_read_text_errors(tmp_path, content, needle):
    p = tmp_path / "t.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        read_text(p)


def test_xz_floor_is_xz_9e_of_the_same_bytes():
    data = (REPO / "data" / "heldout" / "be.txt").read_bytes()[:20000]
    assert xz_bits_per_byte(data) == 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)
    assert 1.5 < xz_bits_per_byte(data) < 3.5  # Cyrillic text: 2 bytes a letter, xz gets ~2.2 bits/byte


def test_heldout_files_are_not_in_the_corpus(corpus_dir):
    """data/heldout: ~150 KB per language, NFC, and no sentence of them in the training corpus."""
    corpus = set()
    for f in corpus_dir.glob("*.txt"):
        corpus |= {
            " ".join(unicodedata.normalize("NFC", x).split()) for x in f.read_text(encoding="utf-8").splitlines()
        }
    for lang in ("be", "ru", "en"):
        text = (REPO / "data" / "heldout" / f"{lang}.txt").read_text(encoding="utf-8")
        assert 140_000 < len(text.encode()) <= 150_000 and unicodedata.is_normalized("NFC", text)
        lines = text.splitlines()
        assert not [x for x in lines if " ".join(x.split()) in corpus], lang

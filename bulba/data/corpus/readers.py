"""Reading a raw mixed corpus as a stream of NFC-normalized documents, batch by batch.

Inputs (`prepare.py INPUT...`): files, directories (searched recursively, hidden entries
skipped), globs, local HF `datasets` folders (`save_to_disk`) and `hf:OWNER/NAME` hub
datasets (online only). `INPUT@WEIGHT` sets a per-source weight (see `parse_input`).

What a document is, per format:
- `.txt`, `.md`: paragraphs separated by blank lines; a file without any blank line is read
  as one document per line (the usual one-sentence-per-line corpus);
- `.jsonl` (and `.json` not starting with `[`): one JSON value per line, the text under
  `--text-field` (default "text"); a bare JSON string is taken as is;
- `.json` starting with `[`: a list of such values (loaded whole: use .jsonl for big data);
- `.parquet`, HF datasets: one row per document, column `--text-field`;
- source code (`.py`, `.rs`, `.sh`, ... see CODE_EXTENSIONS): one file per document; all code
  files under one INPUT form one source with language "code".

Memory stays bounded: files are read in blocks of ~`batch_bytes`, never whole (except a
`.json` list), and every reader yields lists of documents of about that size.
"""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
from pathlib import Path
from typing import Iterator

from bulba.data.corpus.sources import BLANK_LINE, BLOCK, Input
from bulba.errors import UserError

_PARAGRAPHS = re.compile(r"\n[ \t\r\f\v]*\n\s*")

# ---------------------------------------------------------------------------- reading


def nfc(text: str) -> str:
    # is_normalized is a C quick check: the normal case (already NFC) costs one scan.
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def iter_documents(src: Input, text_field: str = "text", batch_bytes: int = BLOCK) -> Iterator[list[str]]:
    """Yield lists of NFC documents (non-empty, stripped) of roughly `batch_bytes` each."""
    if src.kind == "text":
        yield from _iter_text(src.files[0], src.mode, batch_bytes)
    elif src.kind == "code":
        yield from _iter_code(src.files, batch_bytes)
    elif src.kind in ("json", "jsonl"):
        yield from _iter_json(src.files[0], text_field, batch_bytes)
    elif src.kind == "parquet":
        yield from _iter_parquet(src.files[0], text_field, batch_bytes)
    elif src.kind in ("hf-disk", "hf-hub"):
        yield from _iter_hf(src, text_field, batch_bytes)
    else:  # pragma: no cover
        raise ValueError(src.kind)


def text_mode(text: str) -> str:
    """How a text file is cut into documents: "paragraph" if it has a blank line anywhere,
    else "line" (what `scan_source` decides for a whole file)."""
    return "paragraph" if BLANK_LINE.search(text) else "line"  # its class holds \r: CRLF files too


def split_documents(text: str, mode: str) -> list[str]:
    """The documents of a text (already NFC, "\n" line ends) in `mode`: non-empty, stripped.
    The one home of this rule: prepare writes these, eval.py scores these."""
    parts = text.split("\n") if mode == "line" else _PARAGRAPHS.split(text)
    return [d for d in (s.strip() for s in parts) if d]


def _iter_text(path: Path, mode: str, batch_bytes: int) -> Iterator[list[str]]:
    dec = codecs.getincrementaldecoder("utf-8-sig")("strict")  # -sig drops a leading BOM
    carry = ""
    with open(path, "rb") as f:
        while True:
            block = f.read(batch_bytes)
            text = carry + dec.decode(block, final=not block)
            if "\r" in text:
                text = text.replace("\r\n", "\n")
            if block:  # hold back the unfinished last document for the next block
                cut = _last_boundary(text, mode)
                if cut < 0:
                    carry = text
                    continue
                text, carry = text[:cut], text[cut:]
            docs = split_documents(nfc(text), mode)
            if docs:
                yield docs
            if not block:
                break


def _last_boundary(text: str, mode: str) -> int:
    if mode == "line":
        return text.rfind("\n")
    last = -1
    for m in BLANK_LINE.finditer(text, max(0, len(text) - (1 << 16))):
        last = m.start()
    if last < 0:
        for m in BLANK_LINE.finditer(text):
            last = m.start()
    return last


def _batched(texts: Iterator[tuple[str, int]], batch_bytes: int) -> Iterator[list[str]]:
    """(document, its size in bytes) pairs -> lists of documents of about `batch_bytes` each."""
    batch: list[str] = []
    size = 0
    for text, n in texts:
        batch.append(text)
        size += n
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _code_texts(files: list[Path]) -> Iterator[tuple[str, int]]:
    for p in files:
        with open(p, "rb") as f:
            raw = f.read()
        text = nfc(raw.decode("utf-8-sig").replace("\r\n", "\n")).strip("\n").rstrip()
        if text.strip():
            yield text, len(raw)


def _iter_code(files: list[Path], batch_bytes: int) -> Iterator[list[str]]:
    return _batched(_code_texts(files), batch_bytes)


def _text_of(value, field_name: str, where: str) -> str | None:
    if isinstance(value, dict):
        if field_name not in value:
            raise UserError(
                f"{where}: no field {field_name!r} (fields: {', '.join(list(value)[:8]) or 'none'}); "
                f"choose one with --text-field"
            )
        value = value[field_name]
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: field {field_name!r} is {type(value).__name__}, not text")
    return value


def _json_records(path: Path) -> Iterator[tuple[object, str]]:
    """(record, where) pairs of a JSON array / single object or of a JSON Lines file."""
    with open(path, "rb") as f:
        first = f.read(4096).decode("utf-8-sig", errors="ignore").lstrip()[:1]
    if first == "[" or path.suffix.lower() == ".json" and first == "{" and _single_json_object(path):
        try:
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, v in enumerate(data if isinstance(data, list) else [data]):
            yield v, f"{path}: item {i}"
        return
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                v = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
            yield v, f"{path}:{lineno}"


def _json_texts(path: Path, field_name: str) -> Iterator[tuple[str, int]]:
    for v, where in _json_records(path):
        t = _text_of(v, field_name, where)
        if t and t.strip():
            t = nfc(t).strip()
            yield t, len(t)


def _iter_json(path: Path, field_name: str, batch_bytes: int) -> Iterator[list[str]]:
    return _batched(_json_texts(path, field_name), batch_bytes)


def _single_json_object(path: Path) -> bool:
    """A .json file starting with '{': one (possibly pretty-printed) object, or JSON Lines?"""
    with open(path, encoding="utf-8-sig") as f:
        first = f.readline()
    try:
        json.loads(first)
        return False  # the first line is a complete value: JSON Lines
    except json.JSONDecodeError:
        return True


def _check_column(names, field_name: str, where: str) -> None:
    if field_name not in names:
        raise UserError(
            f"{where}: no column {field_name!r} (columns: {', '.join(names)}); choose one with --text-field"
        )


def _iter_column(values, field_name: str, where: str) -> list[str]:
    out = []
    for v in values:
        t = _text_of(v, field_name, where)
        if t and t.strip():
            out.append(nfc(t).strip())
    return out


def _iter_parquet(path: Path, field_name: str, batch_bytes: int) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    _check_column(pf.schema_arrow.names, field_name, str(path))
    for rb in pf.iter_batches(batch_size=4096, columns=[field_name]):
        docs = _iter_column(rb.column(0).to_pylist(), field_name, str(path))
        if docs:
            yield docs


def _load_hf(src: Input):
    import datasets

    datasets.disable_progress_bars()
    if src.kind == "hf-disk":
        try:
            ds = datasets.load_from_disk(src.location)
        except Exception as e:
            raise UserError(f"{src.location}: not a readable datasets folder ({str(e).splitlines()[0]})") from None
        if isinstance(ds, datasets.DatasetDict):
            return [ds["train"]] if "train" in ds else [ds[k] for k in ds]
        return [ds]
    try:
        return [datasets.load_dataset(src.location, split="train", streaming=True)]
    except Exception as e:
        raise UserError(
            f"cannot load hub dataset {src.location} (offline, or a wrong name?): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def _iter_hf(src: Input, field_name: str, batch_bytes: int) -> Iterator[list[str]]:
    for ds in _load_hf(src):
        names = ds.column_names
        if names is not None:
            _check_column(names, field_name, src.name)
        for batch in ds.iter(batch_size=2048):
            if field_name not in batch:
                _check_column(list(batch), field_name, src.name)
            docs = _iter_column(batch[field_name], field_name, src.name)
            if docs:
                yield docs

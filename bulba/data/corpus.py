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
import glob
import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bulba.errors import UserError

TEXT_EXTENSIONS = {".txt", ".md", ".markdown", ".text"}
JSON_EXTENSIONS = {".json", ".jsonl", ".ndjson"}
PARQUET_EXTENSIONS = {".parquet"}
CODE_EXTENSIONS = {
    ".py", ".pyi", ".rs", ".sh", ".bash", ".zsh", ".fish", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu",
    ".go", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".java", ".kt", ".scala", ".swift", ".cs", ".rb",
    ".php", ".pl", ".lua", ".r", ".jl", ".zig", ".hs", ".ml", ".sql", ".toml", ".yaml", ".yml",
    ".css", ".html", ".tex", ".ps1", ".mk", ".cmake", ".proto", ".dart", ".ex", ".erl", ".clj",
}
CODE_NAMES = {"Makefile", "Dockerfile", "CMakeLists.txt", "Justfile"}
BLOCK = 1 << 20
CODE_FILE_MAX = 8 << 20  # a bigger "code" file (a minified bundle, a dump) is read as text

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_PARAGRAPHS = re.compile(r"\n[ \t\r\f\v]*\n\s*")


@dataclass
class Input:
    """One input as prepare sees it: where it comes from, how to read it, what it holds."""

    name: str
    kind: str  # text | json | jsonl | parquet | code | hf-disk | hf-hub
    weight: float = 1.0
    files: list[Path] = field(default_factory=list)
    location: str = ""  # path or hub name, for meta.json
    nbytes: int = 0  # raw size (an estimate for HF datasets), used to scale tokenizer sampling
    mode: str = "line"  # text files: "line" or "paragraph"
    language: str | None = None
    sha256: str = ""


# ---------------------------------------------------------------------------- inputs


def parse_input(spec: str) -> tuple[str, float]:
    """`PATH@WEIGHT` → (PATH, WEIGHT); a plain PATH has weight 1.

    Weights are repeat factors for the train split: 2 writes each document twice (in two
    passes over the source), 0.5 keeps a deterministic half; 0 leaves the source out of
    train (it still feeds val). A path that really contains '@' followed by a number can
    be given as `PATH@1`.
    """
    if "@" in spec and not os.path.exists(spec):
        head, _, tail = spec.rpartition("@")
        try:
            w = float(tail)
        except ValueError:
            return spec, 1.0
        if not (w >= 0 and w < 1e6):
            raise UserError(f"bad weight in {spec!r}: weights are numbers >= 0, e.g. be.txt@3")
        return head, w
    return spec, 1.0


def _is_hf_disk(p: Path) -> bool:
    return p.is_dir() and any((p / n).is_file() for n in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _kind_of(p: Path) -> str | None:
    suf = p.suffix.lower()
    if p.name in CODE_NAMES:
        return "code"
    if suf in TEXT_EXTENSIONS:
        return "text"
    if suf == ".json":
        return "json"
    if suf in (".jsonl", ".ndjson"):
        return "jsonl"
    if suf in PARQUET_EXTENSIONS:
        return "parquet"
    if suf in CODE_EXTENSIONS:
        return "code"
    return None


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def resolve_inputs(specs: list[str]) -> tuple[list[Input], int]:
    """Expand INPUT specs into sources; returns (sources, number of skipped unknown files)."""
    sources: list[Input] = []
    skipped = 0
    for spec in specs:
        pattern, weight = parse_input(spec)
        if pattern.startswith("hf:"):
            name = pattern[3:]
            sources.append(Input(name=pattern, kind="hf-hub", weight=weight, location=name))
            continue
        if glob.has_magic(pattern) and not os.path.exists(pattern):
            paths = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
            if not paths:
                raise UserError(f"input not found: no file matches {pattern!r}")
        else:
            p = Path(pattern)
            if not p.exists():
                raise UserError(f"input not found: {pattern} (hub datasets are written hf:OWNER/NAME)")
            paths = [p]
        code: list[Path] = []
        for p in paths:
            if _is_hf_disk(p):
                sources.append(Input(name=str(p), kind="hf-disk", weight=weight, location=str(p)))
                continue
            if p.is_dir():
                files = list(_walk(p))
                explicit = False
            else:
                files = [p]
                explicit = True
            for f in files:
                kind = _kind_of(f)
                if kind is None:
                    if not explicit:
                        skipped += 1
                        continue
                    kind = "text"  # a file named on the command line is read as text whatever its name
                if kind == "code" and f.stat().st_size <= CODE_FILE_MAX:
                    code.append(f)
                else:
                    if kind == "code":
                        kind = "text"
                    sources.append(Input(name=str(f), kind=kind, weight=weight, files=[f], location=str(f)))
        if code:
            sources.append(Input(name=pattern.rstrip("/") + (f" ({len(code)} code files)" if len(code) > 1 else ""),
                                  kind="code", weight=weight, files=code, location=pattern, language="code"))
    if not sources:
        raise UserError("empty corpus: the inputs hold no readable files "
                        "(.txt .md .json .jsonl .parquet, source code, or HF dataset folders)")
    return sources, skipped


# ---------------------------------------------------------------------------- scanning


def scan_source(src: Input) -> None:
    """Check every file before any heavy work: UTF-8, not binary; hash, size, layout, language."""
    h = hashlib.sha256()
    total = 0
    sample: list[str] = []
    for f in src.files:
        h.update(str(f.name).encode() + b"\0")
        n, blank, text = _scan_file(f, h, check_text=src.kind != "parquet")
        total += n
        if blank:
            src.mode = "paragraph"
        if len(sample) < 64:
            sample.append(text)
    if src.kind == "hf-disk":
        for p in sorted(Path(src.location).rglob("*")):
            if p.is_file():
                total += p.stat().st_size
                h.update(p.name.encode() + str(p.stat().st_size).encode())
    if src.kind == "hf-hub":
        h.update(src.location.encode())
    src.nbytes = total
    src.sha256 = h.hexdigest()
    if src.language is None and sample:
        src.language = guess_language("".join(sample)[:1 << 16], None)


def _scan_file(path: Path, h, check_text: bool) -> tuple[int, bool, str]:
    """Hash `path`; for text, name the byte offset of a NUL or invalid UTF-8. Returns
    (size, has a blank line, first ~64 KB of text)."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    pos = 0
    blank = False
    head = ""
    tail = ""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    with f:
        while True:
            block = f.read(BLOCK)
            h.update(block)
            if check_text:
                if block:
                    nul = block.find(b"\0")
                    if nul >= 0:
                        raise UserError(f"{path}: binary file (NUL byte at byte offset {pos + nul}); "
                                        f"only UTF-8 text is accepted")
                pending = len(dec.getstate()[0])
                try:
                    text = dec.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}: not UTF-8 text (invalid byte at byte offset "
                                    f"{pos - pending + e.start}); convert it to UTF-8 first") from None
                if len(head) < (1 << 16):
                    head += text[: (1 << 16)]
                if not blank:
                    t = tail + text
                    if _BLANK_LINE.search(t):
                        blank = True
                    last = t.rfind("\n")
                    tail = t[last:] if last >= 0 and not t[last + 1:].strip() else ""
            if not block:
                break
            pos += len(block)
    return pos, blank, head


_BE = re.compile("[ўЎіІ]")
_RU = re.compile("[иИщЩъЪ]")
_DECISIVE = re.compile("[ўЎіІиИщЩъЪ]")
_CYR = re.compile("[\u0400-\u04ff]")
_LAT = re.compile("[A-Za-z]")
LANGUAGES = ["be", "ru", "en", "code", "other"]
LANG_ID = {l: i for i, l in enumerate(LANGUAGES)}


def guess_language(text: str, default: str | None) -> str:
    """be / ru / en / other from letters only inside one alphabet: ў,і are Belarusian and
    и,щ,ъ Russian; Cyrillic without either is ambiguous and takes `default` (the source's)."""
    if len(text) > 4096:  # sources: count rather than search
        nbe, nru = len(_BE.findall(text)), len(_RU.findall(text))
        ncyr, nlat = len(_CYR.findall(text)), len(_LAT.findall(text))
        if ncyr == 0 and nlat == 0:
            return "other"
        if ncyr >= nlat:
            return "be" if nbe > nru else "ru"
        return "en"
    m = _DECISIVE.search(text)  # one scan settles most documents
    if m:
        return "be" if m.group() in "ўЎіІ" else "ru"
    if _CYR.search(text):
        return default if default in ("be", "ru") else "ru"
    if _LAT.search(text):
        return "en"
    return default or "other"


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
            text = nfc(text)
            parts = text.split("\n") if mode == "line" else _PARAGRAPHS.split(text)
            docs = [d for d in (s.strip() for s in parts) if d]
            if docs:
                yield docs
            if not block:
                break


def _last_boundary(text: str, mode: str) -> int:
    if mode == "line":
        return text.rfind("\n")
    last = -1
    for m in _BLANK_LINE.finditer(text, max(0, len(text) - (1 << 16))):
        last = m.start()
    if last < 0:
        for m in _BLANK_LINE.finditer(text):
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
            raise UserError(f"{where}: no field {field_name!r} (fields: {', '.join(list(value)[:8]) or 'none'}); "
                            f"choose one with --text-field")
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
        raise UserError(f"{where}: no column {field_name!r} (columns: {', '.join(names)}); choose one with --text-field")


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
        raise UserError(f"cannot load hub dataset {src.location} (offline, or a wrong name?): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


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

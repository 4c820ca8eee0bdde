"""The inputs of prepare (`prepare.py INPUT...`): files, directories (searched recursively,
hidden entries skipped), globs, local HF `datasets` folders (`save_to_disk`) and `hf:OWNER/NAME`
hub datasets (online only); `INPUT@WEIGHT` sets a per-source weight (see `parse_input`). Each
becomes an `Input`: its kind, files, size and content hash (`scan_source`)."""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bulba.data.corpus.language import guess_language
from bulba.errors import UserError

TEXT_EXTENSIONS = {".txt", ".md", ".markdown", ".text"}
JSON_EXTENSIONS = {".json", ".jsonl", ".ndjson"}
PARQUET_EXTENSIONS = {".parquet"}
CODE_EXTENSIONS = {
    ".py",
    ".pyi",
    ".rs",
    ".sh",
    ".bash",
    ".zsh",
    ".fish",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".cu",
    ".go",
    ".js",
    ".mjs",
    ".ts",
    ".tsx",
    ".jsx",
    ".java",
    ".kt",
    ".scala",
    ".swift",
    ".cs",
    ".rb",
    ".php",
    ".pl",
    ".lua",
    ".r",
    ".jl",
    ".zig",
    ".hs",
    ".ml",
    ".sql",
    ".toml",
    ".yaml",
    ".yml",
    ".css",
    ".html",
    ".tex",
    ".ps1",
    ".mk",
    ".cmake",
    ".proto",
    ".dart",
    ".ex",
    ".erl",
    ".clj",
}
CODE_NAMES = {"Makefile", "Dockerfile", "CMakeLists.txt", "Justfile"}
BLOCK = 1 << 20
CODE_FILE_MAX = 8 << 20  # a bigger "code" file (a minified bundle, a dump) is read as text

BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


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
            sources.append(
                Input(
                    name=pattern.rstrip("/") + (f" ({len(code)} code files)" if len(code) > 1 else ""),
                    kind="code",
                    weight=weight,
                    files=code,
                    location=pattern,
                    language="code",
                )
            )
    if not sources:
        raise UserError(
            "empty corpus: the inputs hold no readable files "
            "(.txt .md .json .jsonl .parquet, source code, or HF dataset folders)"
        )
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
        src.language = guess_language("".join(sample)[: 1 << 16], None)


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
                        raise UserError(
                            f"{path}: binary file (NUL byte at byte offset {pos + nul}); only UTF-8 text is accepted"
                        )
                pending = len(dec.getstate()[0])
                try:
                    text = dec.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"{path}: not UTF-8 text (invalid byte at byte offset "
                        f"{pos - pending + e.start}); convert it to UTF-8 first"
                    ) from None
                if len(head) < (1 << 16):
                    head += text[: (1 << 16)]
                if not blank:
                    t = tail + text
                    if BLANK_LINE.search(t):
                        blank = True
                    last = t.rfind("\n")
                    tail = t[last:] if last >= 0 and not t[last + 1 :].strip() else ""
            if not block:
                break
            pos += len(block)
    return pos, blank, head

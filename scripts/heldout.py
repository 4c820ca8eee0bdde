"""Build data/heldout/<lang>.txt: sentences from UD test splits that the shared corpus does not hold.

    python scripts/heldout.py OUT.txt CORPUS_DIR FILE.conllu [FILE.conllu ...] [--max-kb 150]

Takes each `# text = ` line in file order, NFC-normalizes it, and drops it when the same
sentence (compared after NFC, outer whitespace trimmed and inner whitespace collapsed) occurs
anywhere in CORPUS_DIR/*.txt or earlier in the output, or when a sentence of 30+ characters is
part of a corpus line; stops before --max-kb KB (of UTF-8).
Prints what it kept and dropped (data/heldout/README.md records those figures).
"""

from __future__ import annotations

import argparse
import sys
import unicodedata
from pathlib import Path


def key(line: str) -> str:
    return " ".join(unicodedata.normalize("NFC", line).split())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("corpus", type=Path, help="the corpus the held-out text must not overlap (a folder of .txt)")
    ap.add_argument("conllu", type=Path, nargs="+")
    ap.add_argument("--max-kb", type=float, default=150)
    a = ap.parse_args()
    seen = {key(x) for f in sorted(a.corpus.glob("*.txt")) for x in f.read_text(encoding="utf-8").splitlines()}
    seen.discard("")
    joined = "\n".join(seen)  # for sentences a corpus line quotes inside a longer one
    out, size, cap = [], 0, int(a.max_kb * 1000)
    for f in a.conllu:
        kept = dropped = 0
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.startswith("# text = "):
                continue
            text = unicodedata.normalize("NFC", line[len("# text = ") :].strip())
            k = key(text)
            if not k or k in seen or (len(k) >= 30 and k in joined):
                dropped += 1
                continue
            n = len(text.encode()) + 1
            if size + n > cap:
                break
            seen.add(k)
            out.append(text)
            size += n
            kept += 1
        print(f"{f.name}: kept {kept}, dropped {dropped} (in the corpus or repeated)", file=sys.stderr)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("".join(x + "\n" for x in out), encoding="utf-8")
    print(f"{a.out}: {len(out)} lines, {size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Print the most frequent words of a text file and a rough guess of its language."""

import argparse
import re
import sys
from collections import Counter

BELARUSIAN = set("ўі")
RUSSIAN = set("ищъ")


def guess_language(text: str) -> str:
    letters = Counter(ch for ch in text.lower() if ch.isalpha())
    be = sum(letters[c] for c in BELARUSIAN)
    ru = sum(letters[c] for c in RUSSIAN)
    latin = sum(n for c, n in letters.items() if "a" <= c <= "z")
    cyrillic = sum(n for c, n in letters.items() if "\u0400" <= c <= "\u04ff")
    if latin > cyrillic:
        return "en"
    return "be" if be > ru else "ru"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=10, help="how many words to show")
    args = ap.parse_args()
    try:
        with open(args.path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"error: cannot read {args.path}: {e}", file=sys.stderr)
        return 2
    words = re.findall(r"\w+(?:[’']\w+)*", text.lower())
    print(f"{len(words)} words, language: {guess_language(text)}")
    for word, n in Counter(words).most_common(args.top):
        print(f"{n:6d}  {word}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

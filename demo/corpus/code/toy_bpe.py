"""A toy byte-pair encoder, small enough to read in one sitting.

It learns merges from a handful of words and shows how a sentence is split into pieces.
"""

from collections import Counter


def pair_counts(words: dict[tuple[str, ...], int]) -> Counter:
    """Count adjacent symbol pairs, weighted by how often each word occurs."""
    counts = Counter()
    for symbols, freq in words.items():
        for a, b in zip(symbols, symbols[1:]):
            counts[a, b] += freq
    return counts


def merge(words: dict[tuple[str, ...], int], pair: tuple[str, str]) -> dict[tuple[str, ...], int]:
    """Replace every occurrence of `pair` by one joined symbol."""
    joined = pair[0] + pair[1]
    out = {}
    for symbols, freq in words.items():
        new, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                new.append(joined)
                i += 2
            else:
                new.append(symbols[i])
                i += 1
        out[tuple(new)] = out.get(tuple(new), 0) + freq
    return out


def train(text: str, n_merges: int) -> list[tuple[str, str]]:
    words = Counter(tuple(w) for w in text.split())
    merges = []
    for _ in range(n_merges):
        counts = pair_counts(words)
        if not counts:
            break
        best, freq = counts.most_common(1)[0]
        if freq < 2:
            break
        merges.append(best)
        words = merge(words, best)
    return merges


def encode(word: str, merges: list[tuple[str, str]]) -> list[str]:
    symbols = list(word)
    for pair in merges:
        symbols = list(next(iter(merge({tuple(symbols): 1}, pair))))
    return symbols


if __name__ == "__main__":
    corpus = "зубр зубры зубрам бусел буслы буслам bison bisons storks stork"
    rules = train(corpus, 12)
    print("merges:", rules)
    for w in ["зубрамі", "бусліха", "bisonette"]:
        print(w, "->", encode(w, rules))

"""Train a character-level bigram model on a text file: the smallest possible 'language model'.

It counts which character follows which, turns counts into probabilities, and samples.
No libraries, so every step is visible.
"""

import random
import sys
from collections import defaultdict


def fit(text: str) -> dict[str, dict[str, float]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for a, b in zip(text, text[1:]):
        counts[a][b] += 1
    model = {}
    for a, nexts in counts.items():
        total = sum(nexts.values())
        model[a] = {b: n / total for b, n in nexts.items()}
    return model


def sample(model: dict[str, dict[str, float]], start: str, length: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = [start]
    for _ in range(length):
        nexts = model.get(out[-1])
        if not nexts:
            break
        chars, probs = zip(*nexts.items())
        out.append(rng.choices(chars, weights=probs)[0])
    return "".join(out)


def perplexity(model, text: str) -> float:
    import math

    logp, n = 0.0, 0
    for a, b in zip(text, text[1:]):
        p = model.get(a, {}).get(b, 1e-6)
        logp += math.log(p)
        n += 1
    return math.exp(-logp / max(n, 1))


if __name__ == "__main__":
    text = open(sys.argv[1], encoding="utf-8").read() if len(sys.argv) > 1 else "зубр жыве ў пушчы. " * 20
    cut = int(len(text) * 0.9)
    model = fit(text[:cut])
    print("validation perplexity:", round(perplexity(model, text[cut:]), 2))
    print(sample(model, text[0], 80))

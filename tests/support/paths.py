"""Where the repository and the real corpus are, for every test and helper."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def corpus_dir() -> Path:
    """The real be/ru/en corpus: ../shared/corpus beside the repository, or $BULBA_CORPUS."""
    env = os.environ.get("BULBA_CORPUS")
    return Path(env) if env else REPO.parent / "shared" / "corpus"


CORPUS = corpus_dir()

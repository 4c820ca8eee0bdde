"""Suite-wide checks and fixtures. Fixture modules live in tests/support/ and are registered here."""

from __future__ import annotations

import os

import pytest

from support.paths import corpus_dir as _corpus_dir

# Real MLflow server (mlflow_server, mlflow_uri) and the training tests' dataset (train_data).
pytest_plugins = ["support.mlflow_server", "support.train_data", "support.chat_data"]


def pytest_sessionstart(session):
    """Everything the suite tests is installed by `make install`; a missing piece is a broken
    set-up, not a reason to skip. Fail at once rather than go green on skipped tests."""
    if os.environ.get("BULBA_ALLOW_MISSING") == "1":  # explicit opt-out for partial machines
        return
    missing = []
    for mod in ("bulba._rust", "mlflow", "transformers", "accelerate", "llama_cpp", "hypothesis"):
        try:
            __import__(mod)
        except ImportError as e:
            missing.append(f"{mod} ({e})")
    corpus = _corpus_dir()
    if not all((corpus / f"{lang}.txt").is_file() for lang in ("be", "ru", "en")):
        missing.append(f"the real corpus in {corpus} (set BULBA_CORPUS)")
    if missing:
        raise pytest.UsageError("test set-up incomplete, run `make install` first; missing: " + "; ".join(missing))


# ---------------------------------------------------------------------------- prepared data


@pytest.fixture(scope="session")
def corpus_dir():
    """The real be/ru/en corpus (../shared/corpus, or $BULBA_CORPUS); sessionstart checked it."""
    return _corpus_dir()


@pytest.fixture(scope="session")
def prepared_data(corpus_dir, tmp_path_factory):
    """A dataset prepared from the whole real corpus (be, ru, en) with a 1024-token vocabulary
    (tokenizer trained on a 3 MB sample; no MLflow). Returns the data directory; read-only."""
    from bulba.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(
        PrepareConfig(
            inputs=[str(corpus_dir / f"{lang}.txt") for lang in ("be", "ru", "en")],
            out=out,
            vocab_size=1024,
            tokenizer_max_mb=3.0,
            mlflow=False,
            quiet=True,
        )
    )
    return out

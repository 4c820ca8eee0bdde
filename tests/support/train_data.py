"""Training-test fixtures: a small prepared dataset from the shared corpus, built once per session.

`train_data` is the project's `prepared_data` (conftest.py). `build_dataset` makes a smaller one
without prepare.py: HF `tokenizers` (byte-level BPE, 1024 + 5 special tokens), written through
bulba.data.format, for tests that need their own copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bulba.data.format import new_meta, write_meta, write_split
from support.paths import CORPUS
from support.paths import REPO as ROOT

SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def _docs(lines_per_doc: int = 6, per_lang: int = 2400) -> list[str]:
    docs = []
    for lang in ("be", "ru", "en"):
        lines = (CORPUS / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:per_lang]
        for i in range(0, len(lines), lines_per_doc):
            docs.append(" ".join(lines[i : i + lines_per_doc]))
    rng = np.random.default_rng(0)
    rng.shuffle(docs)
    return docs


def build_dataset(out: Path, n_bpe: int = 1024) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    docs = _docs()
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(docs, trainer)
    tok.add_special_tokens(SPECIALS)
    V = tok.get_vocab_size()
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    tok.save(str(out / "tokenizer.json"))
    n_val = len(docs) // 20
    splits = {}
    for split, part in (("val", docs[:n_val]), ("train", docs[n_val:])):
        ids = [np.array([bos] + e.ids + [eos]) for e in tok.encode_batch(part, add_special_tokens=False)]
        splits[split] = write_split(out, split, ids, "uint16")
    write_meta(
        out,
        new_meta(
            dtype="uint16",
            vocab_size=V,
            splits=splits,
            bos_id=bos,
            eos_id=eos,
            pad_id=eos,
            special_tokens={s: tok.token_to_id(s) for s in SPECIALS},
            sources=[],
            tokenizer_sha256="fixture",
            inputs_sha256="fixture",
            dataset_digest=hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest(),
            mlflow_run_id=None,
            created="fixture",
        ),
    )
    return out


@pytest.fixture(scope="session")
def train_data(prepared_data) -> Path:
    """A prepared-data directory for the training tests: the session's real prepared corpus."""
    return prepared_data


# Tiny shapes: a few steps each in seconds on 2 cores.
TINY = [
    "model.n_layer=2",
    "model.n_embd=256",
    "model.n_head=4",
    "model.n_kv_head=1",
    "model.ffn_hidden=256",
    "model.ctx_len=64",
    "train.batch_size=4",
    "train.val_batches=2",
    "train.sample_every=0",
    "train.sample_tokens=4",
    "train.log_every=1",
    "train.threads=1",
    "train.warmup_steps=2",
    "train.mode=eager",  # tiny's default compile pays off in long runs, not in a test's few steps
]


def run_train(args: list[str], env_extra: dict | None = None, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def losses_from(out_dir: Path) -> dict[int, float]:
    """step -> train/loss from metrics.jsonl (the last record per step wins: a resumed run
    replays the steps after its checkpoint)."""
    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]
    return out


def start_train(args, env_extra=None) -> subprocess.Popen:
    """train.py in the background, its stdout and stderr merged (for interruption tests)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_line(proc, needle: str) -> list[str]:
    """The lines `proc` printed up to the first holding `needle` (AssertionError if it ended first)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError("run ended before " + repr(needle) + ":\n" + "".join(seen[-30:]))

"""Chat fixtures: conversations made of real corpus sentences, prepared with the session's
tokenizer (`chat_data`), a tiny pretrained run (`base_run`) and a chat run fine-tuned from it
that has learned to end its turns (`chat_run`), each built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.paths import CORPUS, REPO
from support.train_data import TINY

SYSTEMS = {
    "be": "Ты — памочнік. Адказвай коратка.",
    "ru": "Ты — помощник. Отвечай кратко.",
    "en": "You are a helpful assistant. Answer briefly.",
}


def corpus_conversations(n_per_lang: int = 80, max_chars: int = 70) -> list[dict]:
    """Short conversations: a corpus sentence as the question, the next one as the answer;
    every third with a system turn, every fourth with a second exchange."""
    out = []
    for lang in ("be", "ru", "en"):
        lines = [x.strip() for x in (CORPUS / f"{lang}.txt").read_text(encoding="utf-8").splitlines()]
        lines = [x for x in lines if 10 < len(x) <= max_chars][: 4 * n_per_lang]
        for i in range(n_per_lang):
            q, a = lines[2 * i], lines[2 * i + 1]
            msgs = [{"role": "system", "content": SYSTEMS[lang]}] if i % 3 == 0 else []
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 4 == 1:
                j = 2 * n_per_lang + 2 * i
                msgs += [{"role": "user", "content": lines[j]}, {"role": "assistant", "content": lines[j + 1]}]
            out.append({"messages": msgs})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def chat_data(train_data, tmp_path_factory) -> Path:
    """A chat dataset (format version 2) of corpus conversations, tokenized with the session's
    prepared tokenizer, ctx 128."""
    d = tmp_path_factory.mktemp("chat")
    return _prepare_chat([write_jsonl(d / "chats.jsonl", corpus_conversations())], train_data, d / "data")


def _prepare_chat(inputs: list[Path], tokenizer: Path, out: Path) -> Path:
    from bulba.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(
        inputs=[str(p) for p in inputs],
        out=out,
        format="chat",
        tokenizer=tokenizer,
        ctx_len=128,
        val_fraction=0.1,
        mlflow=False,
        quiet=True,
    )
    prepare(cfg)
    return out


@pytest.fixture(scope="session")
def demo_chat_data(train_data, tmp_path_factory) -> Path:
    """The shipped demo dialogues (short everyday answers), prepared as chat_data is."""
    return _prepare_chat(
        [REPO / "demo" / "chat" / "dialogues.jsonl"], train_data, tmp_path_factory.mktemp("demochat") / "data"
    )


@pytest.fixture(scope="session")
def base_run(train_data, tmp_path_factory) -> Path:
    """A pretrained tiny run (a few steps: what matters is its weights and tokenizer)."""
    from bulba.config import load_recipe
    from bulba.train.run import train

    out = tmp_path_factory.mktemp("base") / "run"
    overrides = TINY + [f"data.dir={train_data}", f"out_dir={out}", "train.max_steps=60", "train.val_every=0"]
    train(load_recipe("tiny", overrides), enable_tracking=False)
    return out


CHAT_TINY = TINY + ["model.ctx_len=128", "train.val_every=0", "train.ckpt_every=0", "train.weight_decay=0"]


@pytest.fixture(scope="session")
def chat_run(base_run, demo_chat_data, tmp_path_factory) -> Path:
    """tiny-chat fine-tuned from `base_run` on the demo dialogues long enough to end its turns
    with <|eot_id|> (measured: greedy replies to export's 3 sample chats all stopped after 200
    steps; on corpus sentence pairs as answers, 1 of 3 still looped at 200)."""
    from bulba.config import load_recipe
    from bulba.train.run import train

    out = tmp_path_factory.mktemp("chatrun") / "run"
    overrides = CHAT_TINY + [
        f"data.dir={demo_chat_data}",
        f"init_from={base_run}",
        f"out_dir={out}",
        "train.max_steps=200",
        "train.lr=2e-3",
        "train.min_lr=2e-4",
        "train.batch_size=8",
    ]
    train(load_recipe("tiny-chat", overrides), enable_tracking=False)
    return out

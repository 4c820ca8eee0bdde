#!/usr/bin/env python3
"""Does a fine-tuned chat model chat? The figures of issue 16's goal, on held-out dialogues.

  python scripts/chat_eval.py --base runs/tiny --chat runs/tiny-chat \\
      --gguf output_models/tiny-chat-q8_0.gguf [--heldout demo/chat/heldout.jsonl]

- assistant-only loss: the mean cross-entropy over the tokens training is scored on (assistant
  contents and their <|eot_id|>, bulba.data.chat's loss mask) of each held-out conversation,
  for the base run's weights and the chat run's (PyTorch, fp32);
- stop rate: in llama.cpp (llama-cpp-python's `create_chat_completion`, greedy, the GGUF's own
  chat template), the share of held-out prompts (the conversation up to its last user turn) whose
  reply ends at the end of the turn (finish_reason "stop") within --max-tokens, and with no
  template token text in the reply (it answered in the trained format).

Prints a Markdown table and a few replies; --json FILE writes the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bulba.errors import ArgumentParser, UserError, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def heldout_conversations(path: Path) -> list[list[dict]]:
    from bulba.data.chat import iter_records
    from bulba.data.corpus import resolve_inputs

    (src,), _ = resolve_inputs([str(path)])
    return [rec["messages"] for rec, _ in iter_records(src)]


def assistant_loss(run: str, convs: list[list[dict]]) -> tuple[float, int]:
    """(mean CE per trained token, number of trained tokens) of `run`'s weights on `convs`."""
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer

    from bulba.data.chat import ChatEncoder, parse
    from bulba.export.source import load_torch_model, open_source
    from bulba.train.init_from import weights_source

    src = open_source(weights_source(run))
    try:
        model = load_torch_model(src)
        enc = ChatEncoder(Tokenizer.from_file(str(src.tokenizer_path)), str(src.tokenizer_path))
        total, n = 0.0, 0
        with torch.no_grad():
            for conv in convs:
                ids, mask = enc.encode(parse({"messages": conv}))
                ids = torch.tensor(ids.astype("int64"))[None]
                logits = model(ids)[0, :-1].float()
                target = ids[0, 1:].clone()
                target[torch.from_numpy(mask[1:] == 0)] = -100
                total += float(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
                n += int((target != -100).sum())
        return total / max(n, 1), n
    finally:
        src.cleanup()


def stop_rate(gguf: Path, convs: list[list[dict]], max_tokens: int, show: int) -> tuple[float, int, list[str]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=0, n_threads=1, verbose=False, seed=0)
    stopped, examples = 0, []
    for conv in convs:
        prompt = conv[:-1]
        r = llm.create_chat_completion(messages=prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
        choice = r["choices"][0]
        text = choice["message"]["content"] or ""
        ok = choice["finish_reason"] == "stop" and "<|" not in text
        stopped += ok
        if len(examples) < show:
            examples.append(f"{prompt[-1]['content']!r} -> {text.strip()!r} ({choice['finish_reason']})")
    return stopped / len(convs), stopped, examples


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the pretrained run (RUN_DIR or runs:/<id>)")
    p.add_argument("--chat", required=True, help="the chat run fine-tuned from it")
    p.add_argument("--gguf", required=True, type=Path, help="the chat run exported (e.g. q8_0)")
    p.add_argument("--heldout", type=Path, default=ROOT / "demo" / "chat" / "heldout.jsonl")
    p.add_argument("--max-tokens", type=int, default=64, help="reply budget (default %(default)s)")
    p.add_argument("--show", type=int, default=6, help="replies printed (default %(default)s)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    if not args.gguf.is_file():
        raise UserError(f"--gguf {args.gguf} does not exist: export the chat run first")
    convs = heldout_conversations(args.heldout)
    base_loss, n = assistant_loss(args.base, convs)
    chat_loss, _ = assistant_loss(args.chat, convs)
    rate, stopped, examples = stop_rate(args.gguf, convs, args.max_tokens, args.show)
    fig = {
        "heldout_conversations": len(convs),
        "assistant_tokens": n,
        "assistant_loss_base": round(base_loss, 4),
        "assistant_loss_chat": round(chat_loss, 4),
        "stop_rate": round(rate, 4),
        "stopped": stopped,
        "max_tokens": args.max_tokens,
    }
    print("| held-out chats | assistant tokens | assistant loss base | assistant loss chat | stop at end of turn |")
    print("|---|---|---|---|---|")
    print(
        f"| {len(convs)} | {n} | {base_loss:.3f} (ppl {math.exp(min(base_loss, 50)):.1f}) | "
        f"{chat_loss:.3f} (ppl {math.exp(min(chat_loss, 50)):.1f}) | {stopped}/{len(convs)} ({rate:.0%}) |"
    )
    for e in examples:
        print(f"  {e}")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    run_cli(main)

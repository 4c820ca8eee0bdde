"""A chat run's GGUF: the template and <|eot_id|> as end of generation in the metadata, llama.cpp
builds the training tokens from messages, greedy replies stop at <|eot_id|> (verified at export),
and `create_chat_completion` stops there; a chat model that never ends its turn fails export."""

from __future__ import annotations

import pytest

from bulba.config import load_recipe
from bulba.data.chat import jinja_template, ollama_template
from bulba.errors import UserError
from bulba.export.gguf import read_back
from bulba.export.pipeline import export
from bulba.export.source import open_source
from bulba.train.run import train
from support.chat_data import CHAT_TINY


def test_chat_gguf_has_the_template_and_stops_at_eot(chat_run, tmp_path):
    from llama_cpp import Llama

    out = tmp_path / "chat-f32.gguf"
    res = export(str(chat_run), "f32", out, mlflow=False, verify=True, quiet=True)
    rep = res.report
    assert rep.passed and rep.chat_tokens_match and rep.chat_replies_stopped == rep.chat_conversations == 3, rep.verdict
    tok = open_source(str(chat_run)).tokenizer
    kv = read_back(out)["kv"]
    assert kv["tokenizer.chat_template"] == jinja_template()
    assert kv["tokenizer.ggml.eot_token_id"] == tok.eot_id == tok.special["<|eot_id|>"]
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eot_id  # a chat model: EOS is the end of its turn
    modelfile = res.modelfile.read_text()
    assert f'TEMPLATE """{ollama_template()}"""' in modelfile and 'PARAMETER stop "<|eot_id|>"' in modelfile
    # llama-cpp-python's chat API with the file's own template: the reply ends at the turn's end
    llm = Llama(model_path=str(out), n_ctx=0, n_threads=1, verbose=False)
    r = llm.create_chat_completion(
        messages=[{"role": "user", "content": "Мінск — гэта горад?"}], max_tokens=64, temperature=0.0, top_k=1
    )
    assert r["choices"][0]["finish_reason"] == "stop", r
    assert "<|" not in r["choices"][0]["message"]["content"]


def test_base_run_keeps_end_of_text_and_checks_the_template(base_run, tmp_path):
    out = tmp_path / "base-q8_0.gguf"
    res = export(str(base_run), "q8_0", out, mlflow=False, verify=True, quiet=True)
    tok = open_source(str(base_run)).tokenizer
    assert res.report.chat_tokens_match is True and res.report.chat_replies_stopped is None
    assert read_back(out)["kv"]["tokenizer.ggml.eos_token_id"] == tok.eos_id != tok.eot_id


def test_a_chat_model_that_never_ends_its_turn_fails_export(base_run, chat_data, tmp_path):
    run = tmp_path / "barely"
    overrides = CHAT_TINY + [f"data.dir={chat_data}", f"init_from={base_run}", f"out_dir={run}", "train.max_steps=1"]
    train(load_recipe("tiny-chat", overrides), enable_tracking=False)
    out = tmp_path / "barely.gguf"
    with pytest.raises(UserError, match=r"ended their turn with <\|eot_id\|> in 0 of 3"):
        export(str(run), "q8_0", out, mlflow=False, verify=True, quiet=True)
    assert not out.exists()

"""Fine-tuning from a pretrained run: init_from loads the parent's weights with a fresh optimizer,
refuses another tokenizer or shape in one line, records the parent in MLflow, and a resumed
chat run (its own checkpoints, the parent gone) equals an uninterrupted one."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from bulba.config import load_recipe
from bulba.data.prepare import PrepareConfig, prepare
from bulba.errors import UserError
from bulba.train.run import train
from support.chat_data import CHAT_TINY, corpus_conversations, write_jsonl
from support.cli import assert_one_line_exit_2
from support.train_data import build_dataset, losses_from, run_train, start_train, wait_for_line

RESUME = CHAT_TINY + ["train.max_steps=6", "train.ckpt_every=2", "train.ckpt_keep=0"]


def test_starts_from_the_parents_weights_with_a_fresh_schedule(base_run, chat_data, tmp_path):
    seen = {}

    def hook(module):
        seen["sd"] = {k: v.clone() for k, v in module.model.state_dict().items()}
        seen["step"] = module.state.step

    out = tmp_path / "chat"
    overrides = CHAT_TINY + [f"data.dir={chat_data}", f"init_from={base_run}", f"out_dir={out}", "train.max_steps=2"]
    train(load_recipe("tiny-chat", overrides), module_hook=hook, enable_tracking=False)
    parent = load_file(str(base_run / "final.safetensors"))
    assert set(seen["sd"]) == set(parent) and seen["step"] == 0
    for k, v in parent.items():
        assert torch.equal(seen["sd"][k].float(), v.float()), k
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train/lr" in x]
    warmup = int(next(o.split("=")[1] for o in CHAT_TINY if o.startswith("train.warmup_steps")))
    lr = load_recipe("tiny-chat").train.lr
    assert metrics[0]["train/lr"] == pytest.approx(lr / warmup)  # the schedule starts over
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["chat"] is True and cfg["recipe"]["init_from"] == str(base_run)


def test_refuses_another_tokenizer_and_another_shape(base_run, chat_data, tmp_path):
    # Same vocabulary size (1024), other token ids: a tokenizer trained anew.
    other = build_dataset(tmp_path / "other", n_bpe=1019)
    src = write_jsonl(tmp_path / "c.jsonl", corpus_conversations(n_per_lang=20))
    data = tmp_path / "chat-other"
    prepare(
        PrepareConfig(
            inputs=[str(src)], out=data, format="chat", tokenizer=other, ctx_len=128, mlflow=False, quiet=True
        )
    )
    base = ["tiny-chat", f"init_from={base_run}", "--no-mlflow", *CHAT_TINY]
    r = run_train(base + [f"data.dir={data}", f"out_dir={tmp_path / 'r1'}"], timeout=180)  # as a user runs it
    assert_one_line_exit_2(r, "tokenizer", str(base_run / "tokenizer.json"), str(data / "tokenizer.json"))

    def refused(*extra):
        with pytest.raises(UserError) as e:
            train(load_recipe("tiny-chat", CHAT_TINY + [f"data.dir={chat_data}", *extra]), enable_tracking=False)
        return str(e.value)

    msg = refused(f"init_from={base_run}", f"out_dir={tmp_path / 'r2'}", "model.n_layer=3")
    assert "n_layer 2 vs 3" in msg and str(base_run / "config.json") in msg
    msg = refused(f"init_from={base_run}", f"out_dir={tmp_path / 'r3'}", "model.tie_embeddings=false")
    assert "tie_embeddings True vs False" in msg
    assert "init_from" in refused(f"init_from={tmp_path / 'nope'}", f"out_dir={tmp_path / 'r4'}")
    assert not any((tmp_path / n).exists() for n in ("r1", "r2", "r3", "r4"))  # nothing written


def test_parent_is_recorded_in_mlflow(base_run, chat_data, tmp_path, mlflow_uri, monkeypatch):
    import mlflow

    from bulba.export.pipeline import export

    out = tmp_path / "chat"
    overrides = CHAT_TINY + [f"data.dir={chat_data}", f"init_from={base_run}", f"out_dir={out}", "train.max_steps=1"]
    # the parent as MLflow knows it: a run id in its config.json (base_run trained offline)
    parent = mlflow.MlflowClient(mlflow_uri).create_run(mlflow.MlflowClient(mlflow_uri).create_experiment("parents"))
    cfg = json.loads((base_run / "config.json").read_text())
    linked = tmp_path / "base"
    shutil.copytree(base_run, linked)
    (linked / "config.json").write_text(json.dumps({**cfg, "mlflow_run_id": parent.info.run_id}))
    overrides[overrides.index(f"init_from={base_run}")] = f"init_from={linked}"
    train(load_recipe("tiny-chat", overrides))
    run_id = json.loads((out / "config.json").read_text())["mlflow_run_id"]
    tags = mlflow.MlflowClient(mlflow_uri).get_run(run_id).data.tags
    assert tags["bulba.parent_run_id"] == parent.info.run_id
    assert tags["bulba.init_from"] == str(linked) and tags["bulba.parent_weights"].endswith("final.safetensors")
    # base run -> chat run -> GGUF: the export run and the model version name the parent too
    monkeypatch.chdir(tmp_path)
    res = export(str(out), "q8_0", tmp_path / "c.gguf", register="chat-lineage", verify=False, quiet=True)
    client = mlflow.MlflowClient(mlflow_uri)
    export_tags = client.get_run(res.mlflow["run_id"]).data.tags
    assert export_tags["bulba.parent_run_id"] == parent.info.run_id and export_tags["mlflow.parentRunId"] == run_id
    mv = client.get_model_version("chat-lineage", res.mlflow["version"])
    assert mv.tags["parent_run"] == parent.info.run_id and mv.tags["chat"] == "True"
    assert f"Fine-tuned from {linked} on conversations." in mv.description


def test_resumed_chat_run_equals_uninterrupted_and_ignores_the_parent(base_run, chat_data, tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(base_run, parent)
    args = ["tiny-chat", f"data.dir={chat_data}", f"init_from={parent}", "--no-mlflow", *RESUME]
    r = run_train(args + [f"out_dir={tmp_path / 'ref'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    reference = losses_from(tmp_path / "ref")
    out = tmp_path / "run"
    proc = start_train(args + [f"out_dir={out}"])
    try:
        wait_for_line(proc, "step      3/6")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143
    shutil.rmtree(parent)  # a resumed run continues its own checkpoints: the parent is not read again
    r = run_train(args + [f"out_dir={out}", "resume=auto"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "initialized from" not in r.stdout and "resuming from" in r.stdout
    got = losses_from(out)
    assert sorted(got) == sorted(reference) == list(range(1, 7))
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), (step, got, reference)

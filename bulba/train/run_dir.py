"""The run directory (docs/contracts.md, "Runs") and the run's record: metrics.jsonl and MLflow.

    out_dir/config.json        written at start (export.py can read any checkpoint of the run)
    out_dir/tokenizer.json     copy of the data's tokenizer
    out_dir/recipe.yaml        the resolved recipe (recipe-resume-N.yaml for each resume)
    out_dir/metrics.jsonl      every logged metric, also when the tracking server is down
    out_dir/samples.jsonl      generated samples
    out_dir/logs/rank-R.json   what data each rank consumed
    out_dir/checkpoints/step-N resumable state (bulba.train.checkpoint)
    out_dir/final.safetensors  fp32 weights, written last, only from finite weights

Only global rank 0 writes here (rank logs aside); `RunDir` on other ranks writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from bulba import hardware
from bulba.atomic import atomic_open, write_json, write_text
from bulba.config import Recipe
from bulba.errors import UserError
from bulba.tracking.lineage import dataset_input, flatten, git_commit

RUN_FORMAT = "bulba-run"
RUN_VERSION = 1


class TrainingFault(UserError):
    """The run stopped on a numerical fault (a checkpoint from before it was written)."""


class Tracker:
    """The one place training talks to MLflow: bulba.tracking.RunTracker (queued, spooled to
    out_dir/mlflow_spool.jsonl, replayed after an outage; `python -m bulba.tracking sync
    OUT_DIR` sends what a dead server never got). Metrics also go to out_dir/metrics.jsonl, the
    plain local record the tests and quick scripts read."""

    def __init__(self, enabled: bool, metrics_file: Path | None):
        self.enabled = enabled
        self._rt = None
        self._metrics_file = metrics_file
        self._fh = open(metrics_file, "a", encoding="utf-8") if metrics_file else None

    @property
    def run_id(self) -> str | None:
        return self._rt.run_id if self._rt is not None else None

    def start(
        self, experiment: str, run_name: str | None, run_dir: Path, run_id: str | None, tags: dict, params: dict | None
    ) -> str | None:
        if not self.enabled:
            return None
        from bulba.tracking import RunTracker

        # resume=True + run_dir: a run dir holding mlflow_run.json continues that run (same id).
        # skip_logged_steps: after a SIGKILL, resume=auto replays the steps between the last
        # checkpoint and the kill; the spool says which the dead process already logged, and
        # those are not logged again (each step once in MLflow's history, as an uninterrupted run).
        self._rt = RunTracker(
            experiment,
            run_name,
            run_dir=run_dir,
            run_id=run_id,
            tags=tags,
            params=params,
            resume=True,
            system_metrics=True,
            skip_logged_steps=True,
        )
        return self._rt.run_id

    def tags(self, d: dict):
        if self._rt is not None:
            self._rt.set_tags({k: str(v) for k, v in d.items()})

    def metrics(self, d: dict, step: int):
        if self._fh is not None:
            try:
                self._fh.write(json.dumps({"step": step, "time": time.time(), **d}) + "\n")
                self._fh.flush()
            except OSError as e:  # disk full: the weights matter more than the local log; say it once
                if not getattr(self, "_warned", False):
                    self._warned = True
                    print(
                        f"warning: cannot write {self._metrics_file} ({e.strerror or e}); training continues"
                        + (", metrics still go to MLflow" if self._rt is not None else ""),
                        file=sys.stderr,
                        flush=True,
                    )
        if self._rt is not None:
            clean = {k: float(v) for k, v in d.items() if v is not None and math.isfinite(float(v))}
            self._rt.log_metrics(clean, step=step)

    def artifact(self, path: Path, artifact_path: str | None = None):
        if self._rt is not None:
            self._rt.log_artifact(str(path), artifact_path)

    def log_input(self, dataset, context: str):
        if self._rt is not None:
            self._rt.log_input(dataset, context=context)

    def end(self, status: str = "FINISHED"):
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        if self._rt is not None:
            self._rt.finish(status)
            self._rt = None


def config_document(
    model, token_ids: dict, recipe: dict, dataset_digest: str | None, run_id: str | None, chat: bool = False
) -> dict:
    """config.json of a run directory (docs/contracts.md, "Runs"): the one place its form is written."""
    return {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "model": dataclasses.asdict(model),
        "tokenizer": {**token_ids, "add_bos_token": True},
        "recipe": recipe,
        "dataset_digest": dataset_digest,
        "mlflow_run_id": run_id,
        # Trained on conversations (a loss mask): export makes <|eot_id|> the end of generation.
        "chat": chat,
    }


def run_config(recipe: Recipe, data, run_id: str | None) -> dict:
    ids = {"bos_id": data.bos_id, "eos_id": data.eos_id, "pad_id": data.pad_id}
    return config_document(recipe.model, ids, recipe.to_dict(), data.dataset_digest, run_id, data.has_loss_mask)


def write_weights_run(
    out: Path, model, tokenizer, state: dict, *, recipe_name: str, dataset_digest=None, run_id=None
) -> Path:
    """A run directory holding given weights without a training run (benchmarks, tests): tokenizer.json,
    final.safetensors and config.json, exactly as a trained run has them."""
    from safetensors.torch import save_file

    from bulba.data.tokenizer import BOS, EOS

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "final.safetensors"))
    ids = {
        "bos_id": tokenizer.token_to_id(BOS),
        "eos_id": tokenizer.token_to_id(EOS),
        "pad_id": tokenizer.token_to_id(EOS),
    }
    write_json(out / "config.json", config_document(model, ids, {"name": recipe_name}, dataset_digest, run_id))
    return out


class RunDir:
    """out_dir and its MLflow run, from start to the final weights (global rank 0 writes)."""

    def __init__(self, recipe: Recipe, data, rank0: bool, tracker: Tracker | None, run_id: str | None):
        self.recipe, self.data, self.rank0, self.tracker = recipe, data, rank0, tracker
        self.out = Path(recipe.out_dir)
        self._run_id = run_id
        self._written_id = run_id

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; known late when the server was slow or down at start."""
        return (self.tracker.run_id if self.tracker else None) or self._run_id

    def refresh_config(self) -> None:
        # The MLflow run id may only become known after start (server slow or down): put it
        # into config.json as soon as it is, so export.py links to the right run.
        rid = self.run_id
        if self.rank0 and rid and rid != self._written_id:
            write_json(self.out / "config.json", run_config(self.recipe, self.data, rid))
            self._written_id = rid

    def tags(self, d: dict) -> None:
        if self.tracker:
            self.tracker.tags(d)

    def write_rank_log(self, module, trainer) -> None:
        """Per-rank record of what data this rank consumed (fingerprints of its first batches)."""
        with contextlib.suppress(OSError):
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
            write_json(
                self.out / "logs" / f"rank-{trainer.global_rank}.json",
                {
                    "rank": trainer.global_rank,
                    "world_size": trainer.world_size,
                    "consumed": module.state.consumed,
                    "first_batches_sha256": module.fingerprints,
                },
            )

    def write_final(self, module, weights: dict | None) -> None:
        """final.safetensors from `weights` (the final checkpoint's; None: the module's), then
        config.json with the run id, and both to MLflow."""
        from safetensors.torch import save

        out, recipe = self.out, self.recipe
        src = weights or module.model.state_dict()
        sd = {k: v.detach().float().cpu().contiguous().clone() for k, v in src.items()}
        bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
        if bad:
            raise TrainingFault(f"final weights contain NaN/Inf ({', '.join(bad[:3])}); not writing final.safetensors")
        V = recipe.model.vocab_size
        assert sd["tok_embeddings.weight"].shape[0] == V
        try:
            with atomic_open(out / "final.safetensors", "wb") as f:
                f.write(save(sd, metadata={"format": "pt", "bulba.step": str(module.state.step)}))
        except OSError as e:
            raise UserError(
                f"cannot write {out / 'final.safetensors'} ({e.strerror or e}); the final checkpoint "
                f"in {out / 'checkpoints'} holds the same weights"
            ) from None
        write_json(out / "config.json", run_config(recipe, self.data, self.run_id))
        print(f"wrote {out / 'final.safetensors'} ({len(sd)} tensors, step {module.state.step})", flush=True)
        if self.tracker:
            self.tracker.artifact(out / "final.safetensors", "model")
            self.tracker.artifact(out / "config.json", "model")
            self.tracker.artifact(out / "tokenizer.json", "model")

    def close(self, status: str, samples: list) -> None:
        """samples.jsonl (appended: a resumed run adds its own) and the MLflow run's end."""
        if not (self.rank0 and self.tracker):
            return
        if samples:
            with open(self.out / "samples.jsonl", "a", encoding="utf-8") as f:
                for s in samples:
                    f.write(json.dumps(s, ensure_ascii=False) + "\n")
            self.tracker.artifact(self.out / "samples.jsonl")
        self.tracker.end(status)


def open_run(recipe: Recipe, plan, loaded: dict | None, run_id: str | None, enable_tracking: bool) -> RunDir:
    """Create (or continue) out_dir and its MLflow run on global rank 0: config.json, the
    tokenizer, the recipe, tags and params. `run_id`: the MLflow run a resumed run continues."""
    out, data = Path(recipe.out_dir), plan.data
    if not plan.rank0:
        return RunDir(recipe, data, False, None, run_id)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    tracker = Tracker(enable_tracking, out / "metrics.jsonl")
    new_run = run_id is None and not (out / "mlflow_run.json").exists()
    commit = git_commit()
    tags = {
        "bulba.stage": "train",
        "bulba.git_commit": commit,
        "mlflow.source.git.commit": commit.removesuffix("-dirty"),
        "bulba.dataset_digest": data.dataset_digest or "unknown",
        "bulba.prepare_run_id": data.meta.get("mlflow_run_id") or "none",
        "bulba.data_dir": str(data.dir.resolve()),
        "bulba.params": plan.n_params,
        "bulba.preset": recipe.name,
        # At start, not only after fit: the runs table's mode column is filled while a run trains.
        "bulba.mode": recipe.train.mode,
        "bulba.precision": plan.precision,
        "bulba.precision_reason": plan.precision_reason[:4000],
        **(
            {
                "bulba.cpu": hardware.cpu_model(),
                "bulba.cpu_isa": hardware.cpu_isa(),
                "bulba.threads": hardware.thread_reason(recipe.train.threads),
            }
            if plan.accelerator == "cpu"
            else {}
        ),
        "bulba.accelerator": plan.accelerator,
        "bulba.out_dir": str(out.resolve()),
    }
    run_id = (
        tracker.start(
            recipe.tracking.experiment,
            recipe.tracking.run_name or f"{recipe.name}-{out.name}",
            out,
            run_id,
            tags,
            flatten(recipe.to_dict()) if new_run else None,
        )
        or run_id
    )
    shutil.copyfile(data.dir / "tokenizer.json", out / ".tmp-tokenizer.json")
    os.replace(out / ".tmp-tokenizer.json", out / "tokenizer.json")
    write_json(out / "config.json", run_config(recipe, data, run_id))
    recipe_yaml = yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
    write_text(out / "recipe.yaml", recipe_yaml)
    if new_run:
        tracker.artifact(out / "recipe.yaml")
        tracker.artifact(out / "tokenizer.json")
        _log_dataset(tracker, data)
    else:
        step0 = loaded["state"]["train"]["step"] if loaded else 0
        write_text(out / f"recipe-resume-{step0:08d}.yaml", recipe_yaml)
        tracker.artifact(out / f"recipe-resume-{step0:08d}.yaml")
        tracker.tags({f"bulba.resumed_at_step_{step0}": commit})
    return RunDir(recipe, data, True, tracker, run_id)


def _log_dataset(tracker: Tracker, data):
    """Link the prepare run's dataset as an MLflow dataset input (best effort)."""
    try:
        tracker.log_input(dataset_input(data.dir, data.dtype, data.dataset_digest), context="training")
    except Exception as e:  # noqa: BLE001 - the tag bulba.dataset_digest carries the same link
        print(f"warning: could not log the dataset input to MLflow ({e})", file=sys.stderr)

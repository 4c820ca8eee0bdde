"""Recipes: typed config dataclasses, YAML presets and dotted command-line overrides.

A recipe is a YAML file whose sections mirror the dataclasses below (LitGPT style).
`load_recipe("aist", ["train.max_steps=100"])` returns a validated `Recipe`;
an unknown key names the closest valid one, a wrong type names the expected one, and all
of it happens before anything heavy (data, model, tracking) starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from bulba.errors import UserError

# Presets ship inside the package (package data), so an installed bulba finds them too.
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


@dataclass
class ModelConfig:
    """Llama-3 architecture hyperparameters (names as in the paper / llama.cpp)."""

    vocab_size: Optional[int] = None  # None: taken from the prepared data's tokenizer
    n_layer: int = 2
    n_embd: int = 256  # multiple of 256: llama.cpp K-quants need it
    n_head: int = 4
    n_kv_head: int = 1  # grouped-query attention: n_head / n_kv_head queries share a KV head
    ffn_hidden: int = 768  # SwiGLU hidden size, multiple of 256
    ctx_len: int = 256
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self, where: str = "model") -> None:
        for key in ("n_layer", "n_embd", "n_head", "n_kv_head", "ffn_hidden", "ctx_len"):
            if getattr(self, key) <= 0:
                raise UserError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise UserError(f"{where}.vocab_size must be positive, got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise UserError(f"{where}.n_embd ({self.n_embd}) must be divisible by {where}.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise UserError(f"{where}.n_head ({self.n_head}) must be divisible by {where}.n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise UserError(f"{where}: head dim n_embd/n_head = {self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise UserError(f"{where}.rope_theta and {where}.norm_eps must be positive")


@dataclass
class DataConfig:
    dir: str = "data/demo"
    sampler: Literal["stream", "packed", "bucketed"] = "stream"
    # bucketed sampler: fixed sequence lengths (so torch.compile sees few shapes)
    buckets: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    prefetch: int = 4  # batches assembled ahead on the Rust background thread


@dataclass
class TrainConfig:
    mode: Literal["eager", "flash", "compile", "both"] = "eager"
    precision: Literal["auto", "bf16-mixed", "32-true"] = "auto"  # auto: measured per machine (bulba.hardware)
    batch_size: int = 8  # sequences per device per micro-step
    grad_accum: int = 1
    max_steps: int = 100  # optimizer steps
    max_tokens: Optional[int] = None  # token budget; stops at whichever comes first
    # Wall-clock budget of the training loop ("15m", "2h", "90s", "1h30m" or seconds). Set, it is
    # the run's length: the lr schedule follows the fraction of it spent, the run ends when it is
    # spent (or at max_tokens), and max_steps does not apply (a preset's step count never cuts a
    # timed run short). See docs/training.md.
    max_time: Optional[Union[float, str]] = None
    optimizer: Literal["adamw", "muon"] = "adamw"
    # optimizer=muon: lr of the Muon group (the 2-D matrices of the blocks). Muon's update is
    # scaled to AdamW's RMS (adjust_lr_fn="match_rms_adamw"), so null = train.lr works.
    muon_lr: Optional[float] = None
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    val_every: int = 50
    val_batches: int = 8
    sample_every: int = 0  # 0: only at the end
    sample_tokens: int = 32
    ckpt_every: int = 50
    log_every: int = 1
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    nan_policy: Literal["skip", "stop"] = "stop"
    nan_max_skips: int = 10  # nan_policy=skip: stop after this many non-finite steps in a row
    ckpt_keep: int = 2  # newest complete checkpoints kept (0: all)
    sample_prompts: list[str] = field(
        default_factory=lambda: ["Мінск — гэта", "Москва — столица", "The river", "def main("]
    )
    threads: int = 0  # CPU threads for torch (0: torch's default)

    @property
    def max_time_s(self) -> float | None:
        """train.max_time in seconds (None: no time budget)."""
        return None if self.max_time is None else parse_duration(self.max_time, "train.max_time")


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(d|h|m|s)", re.IGNORECASE)
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: Any, key: str) -> float:
    """Seconds in "15m", "2h", "90s", "1h30m", "1.5h", or a plain number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or _DURATION.sub("", text).strip():
                raise UserError(
                    f"{key}: cannot read {value!r} as a duration; give e.g. 15m, 2h, 90s, 1h30m or seconds"
                ) from None
            seconds = sum(float(n) * _UNIT_S[u.lower()] for n, u in parts)
    else:
        raise UserError(f"{key}: expected a duration (e.g. 15m, 2h, 90s) or seconds, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"{key} must be a positive duration, got {value!r}")
    return seconds


@dataclass
class TrackingConfig:
    experiment: str = "bulbagpt"
    run_name: Optional[str] = None


@dataclass
class Recipe:
    name: str = "custom"
    out_dir: str = "runs/custom"
    seed: int = 1337
    resume: Literal["never", "auto"] = "never"
    # Fine-tuning: start from a pretrained run's weights (RUN_DIR or runs:/<id>; bulba.train.init_from)
    init_from: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        self.model.validate()
        if self.init_from is not None and not self.init_from.strip():
            raise UserError("init_from must name a run directory or runs:/<run_id> (or be left unset)")
        t = self.train
        for key in ("batch_size", "grad_accum", "max_steps", "val_batches", "log_every"):
            if getattr(t, key) <= 0:
                raise UserError(f"train.{key} must be positive, got {getattr(t, key)}")
        for key in ("warmup_steps", "val_every", "sample_every", "ckpt_every", "sample_tokens", "ckpt_keep", "threads"):
            if getattr(t, key) < 0:
                raise UserError(f"train.{key} must be >= 0, got {getattr(t, key)}")
        if t.max_tokens is not None and t.max_tokens <= 0:
            raise UserError(f"train.max_tokens must be positive, got {t.max_tokens}")
        t.max_time_s  # noqa: B018 (parses: a bad duration is refused here, before anything starts)
        if t.muon_lr is not None and not (0 < t.muon_lr < 1):
            raise UserError(f"train.muon_lr must be in (0, 1), got {t.muon_lr}")
        if t.optimizer == "muon" and t.strategy == "fsdp":
            raise UserError(
                "train.optimizer=muon does not work with train.strategy=fsdp (Muon orthogonalizes whole "
                "matrices; FSDP shards them); use train.strategy=ddp or train.optimizer=adamw"
            )
        if not (0 < t.lr < 1) or not (0 <= t.min_lr <= t.lr):
            raise UserError(f"train.lr must be in (0, 1) and train.min_lr in [0, lr], got {t.lr}, {t.min_lr}")
        if t.nan_max_skips <= 0:
            raise UserError(f"train.nan_max_skips must be positive, got {t.nan_max_skips}")
        if t.grad_clip < 0 or t.weight_decay < 0:
            raise UserError("train.grad_clip and train.weight_decay must be >= 0")
        if not self.data.buckets or any(b <= 0 for b in self.data.buckets):
            raise UserError(f"data.buckets must be a non-empty list of positive lengths, got {self.data.buckets}")
        if max(self.data.buckets) > self.model.ctx_len and self.data.sampler == "bucketed":
            raise UserError(
                f"data.buckets has {max(self.data.buckets)}, longer than model.ctx_len={self.model.ctx_len}; "
                "drop the longer buckets or raise model.ctx_len"
            )
        if self.data.prefetch <= 0:
            raise UserError(f"data.prefetch must be positive, got {self.data.prefetch}")
        d = t.devices
        ok = (
            d == "auto"
            or (isinstance(d, int) and not isinstance(d, bool) and d > 0)
            or (isinstance(d, list) and d and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in d))
        )
        if not ok:
            raise UserError(f"train.devices must be 'auto', a positive count or a list of device ids, got {d!r}")
        if t.num_nodes <= 0:
            raise UserError(f"train.num_nodes must be positive, got {t.num_nodes}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int → float, nothing else implicit."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{key}: expected one of {_type_name(tp)}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise UserError(f"unknown recipe key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"override '{ov}' must look like section.key=value (e.g. train.max_steps=100)")
        key, raw = ov.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"override '{ov}' has no key before '='")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise UserError(f"override '{key}': the value is nested too deeply") from None
        out.append((key, value))
    return out


def resolve_recipe_path(name_or_path: str) -> Path:
    """A YAML path, or a preset of bulba/recipes/ by name (`aist`, `aist.yaml`, or the old `recipes/aist.yaml`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (RECIPES_DIR / p.name, RECIPES_DIR / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    presets = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
    raise UserError(f"recipe '{name_or_path}' not found; give a YAML path or one of: {', '.join(presets)}")


def _validated(cls, tree: dict, prefix: str, source: str):
    """`cls` built from `tree` and validated; errors name `source` (the file they came from)."""
    try:
        obj = _build(cls, tree, prefix)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    obj.validate()
    return obj


def recipe_from_dict(tree: dict, overrides: list[str] | None = None, source: str = "recipe") -> Recipe:
    tree = dict(tree)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return _validated(Recipe, tree, "", source)


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    p = resolve_recipe_path(path)
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read recipe {p}: {e}") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise UserError(f"recipe {p}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise UserError(f"recipe {p} is nested too deeply to be a recipe") from None
    if not isinstance(tree, dict):
        raise UserError(f"recipe {p} must be a mapping of sections, got {type(tree).__name__}")
    return recipe_from_dict(tree, overrides, source=str(p))


def model_config_from_dict(d: dict, source: str = "config.json") -> ModelConfig:
    return _validated(ModelConfig, d, "model.", source)

"""What export.py reads: a run directory, a final.safetensors, or `runs:/<run_id>` in MLflow.

Everything is checked before anything is written: the config parses, the tokenizer covers
exactly `vocab_size` ids with unique tokens, and the safetensors header holds exactly the
weight names and shapes of docs/contracts.md. Weights themselves are read one tensor at a
time later (the writers check NaN/Inf as they stream), so a source is cheap to open.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bulba.config import ModelConfig, model_config_from_dict
from bulba.errors import UserError
from bulba.export.vocab import TokenizerInfo, load_json, read_tokenizer
from bulba.model.weights import expected_shapes, min_tensors

WEIGHTS_NAME = "final.safetensors"
CHECKPOINT_WEIGHTS = "model.safetensors"  # runs/<run>/checkpoints/step-N/
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"

# safetensors dtype -> bytes per element (the float types a checkpoint may hold)
_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


@dataclass
class Source:
    run_dir: Path
    weights: Path
    tokenizer_path: Path
    config: dict
    model: ModelConfig
    tokenizer: TokenizerInfo
    shapes: dict[str, tuple[int, ...]]
    name: str
    mlflow_run_id: str | None
    dtypes: dict[str, str] = field(default_factory=dict)  # safetensors dtype per weight
    _tmp: str | None = field(default=None, repr=False)

    def cleanup(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def num_params(self) -> int:
        return int(sum(np.prod(s) for s in self.shapes.values()))

    def read_tensor(self, name: str) -> np.ndarray:
        """One weight as float32 numpy, checked finite (NaN/Inf weights make an unusable model)."""
        from safetensors import safe_open

        if self.dtypes.get(name, "F32") in ("F32", "F16", "F64"):
            # numpy reads these directly: the GGUF path then never imports torch (~300 MB RSS)
            with safe_open(str(self.weights), framework="np") as f:
                t = f.get_tensor(name).astype(np.float32, copy=False)
        else:  # BF16 has no numpy dtype
            with safe_open(str(self.weights), framework="pt") as f:
                t = f.get_tensor(name).float().numpy()
        if not np.isfinite(t).all():
            bad = int((~np.isfinite(t)).sum())
            raise UserError(
                f"{self.weights}: weight '{name}' has {bad} NaN/Inf values; "
                "export a checkpoint from before the training diverged"
            )
        return t


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from the header, checking the file is complete."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or n > min(size - 8, 100 << 20):
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise UserError(
            f"{path} is not a readable safetensors file ({e}); re-run training or pick another checkpoint"
        ) from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (its header is not a JSON object); re-run training")
    header.pop("__metadata__", None)
    end = 0
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            if not (
                isinstance(dtype, str)
                and isinstance(shape, list)
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, start, stop))
                and start <= stop
            ):
                raise ValueError(name)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"{path}: malformed safetensors header entry for {name!r} ({type(e).__name__}); "
                "re-run training or pick another checkpoint"
            ) from None
        out[name] = (dtype, tuple(shape))
        end = max(end, stop)
    if 8 + n + end > size:
        raise UserError(
            f"{path} is truncated ({size} bytes, header promises {8 + n + end}); "
            "the training run probably did not finish writing it"
        )
    return out


def _download_run(uri: str) -> tuple[Path, str]:
    """`runs:/<run_id>[/path]` -> a local folder holding final.safetensors, config and tokenizer."""
    import mlflow

    from bulba.tracking import check_reachable, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    check_reachable(f"cannot download {uri}")
    if not sys.stderr.isatty():  # progress bars only for a person watching: logs and errors stay one line
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tmp = tempfile.mkdtemp(prefix="bulba-export-src-")
    try:
        run_id, _, sub = uri[len("runs:/") :].strip("/").partition("/")
        if not run_id:
            raise ValueError("no run id after runs:/")
        # MLflow refuses a bare runs:/<id>; the run id form fetches the whole artifact tree.
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=sub or "", dst_path=tmp))
    except Exception as e:  # MlflowException, connection errors: all one line for the user
        shutil.rmtree(tmp, ignore_errors=True)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"cannot download {uri} from MLflow ({msg}); check the run id and MLFLOW_TRACKING_URI"
        ) from None
    if local.is_file():
        local = local.parent
    # The weights may sit in a sub-folder of the run's artifacts (e.g. model/).
    hits = sorted(local.rglob(WEIGHTS_NAME), key=lambda p: len(p.parts))
    if not hits:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{uri} has no {WEIGHTS_NAME} among its artifacts; is it a finished training run?")
    run_dir = hits[0].parent
    for name in (CONFIG_NAME, TOKENIZER_NAME):
        if not (run_dir / name).exists():
            found = sorted(local.rglob(name), key=lambda p: len(p.parts))
            if found:
                shutil.copyfile(found[0], run_dir / name)
    return run_dir, tmp


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The weights of run_dir's newest checkpoints/step-N (by N), or None."""
    steps = [p for p in (run_dir / "checkpoints").glob(f"step-*/{CHECKPOINT_WEIGHTS}") if p.parent.name[5:].isdigit()]
    return max(steps, key=lambda p: int(p.parent.name[5:]), default=None)


def open_source(source: str, checkpoint_fallback: bool = False) -> Source:
    """`checkpoint_fallback`: a run directory without final weights gives its newest checkpoint
    (eval.py scores a run still training; export refuses, so that it never ships one unawares)."""
    tmp = None
    if source.startswith("runs:/"):
        run_dir, tmp = _download_run(source)
        weights = run_dir / WEIGHTS_NAME
    else:
        p = Path(source)
        if not p.exists():
            raise UserError(f"source {source} does not exist; give a run directory, a {WEIGHTS_NAME} or runs:/<run_id>")
        if p.is_dir():
            run_dir, weights = p, p / WEIGHTS_NAME
            if not weights.exists() and (p / CHECKPOINT_WEIGHTS).exists():  # a checkpoints/step-N folder
                weights = p / CHECKPOINT_WEIGHTS
            newest = newest_checkpoint(p) if not weights.exists() else None
            if newest is not None and checkpoint_fallback:
                weights = newest
            if not weights.exists():
                hint = f", or export its newest checkpoint {newest}" if newest else ""
                raise UserError(f"run directory {p} has no {WEIGHTS_NAME}: training has not finished{hint}")
        else:
            if p.suffix != ".safetensors":
                raise UserError(f"source {source} is not a .safetensors file or run directory")
            run_dir, weights = p.parent, p
        # A checkpoint's weights sit two levels below the run's config.json and tokenizer.json.
        for up in [run_dir, *list(run_dir.parents)[:2]]:
            if (up / CONFIG_NAME).exists():
                run_dir = up
                break
    try:
        return _open_local(run_dir, weights, source, tmp)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_local(run_dir: Path, weights: Path, source: str, tmp: str | None) -> Source:
    cfg_path = run_dir / CONFIG_NAME
    config = load_json(cfg_path, f"every run directory has config.json beside {WEIGHTS_NAME}")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"{cfg_path} has no 'model' section (expected the bulba-run format of docs/contracts.md)")
    cfg = model_config_from_dict(config["model"], source=str(cfg_path))
    if cfg.vocab_size is None:
        raise UserError(f"{cfg_path}: model.vocab_size is missing")
    tok_path = cfg_path.parent / TOKENIZER_NAME
    tok = read_tokenizer(tok_path, config.get("tokenizer") or {}, cfg.vocab_size)

    header = read_safetensors_header(weights)
    if min_tensors(cfg) > len(header):  # before listing n_layer blocks of names: n_layer may be absurd
        raise UserError(
            f"{weights} does not match {cfg_path}: model.n_layer={cfg.n_layer} needs "
            f"{min_tensors(cfg)}+ tensors, the file has {len(header)}"
        )
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in header]
    extra = [k for k in header if k not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
            )
        if extra:
            parts.append(
                f"unexpected {', '.join(extra[:3])}" + (f" (+{len(extra) - 3} more)" if len(extra) > 3 else "")
            )
        raise UserError(f"{weights} does not match {cfg_path}: {'; '.join(parts)}")
    for k, shape in want.items():
        dtype, got = header[k]
        if dtype not in _ST_DTYPES:
            raise UserError(f"{weights}: weight '{k}' has dtype {dtype}; expected a float type")
        if got != shape:
            raise UserError(
                f"{weights} does not match {cfg_path}: '{k}' has shape {list(got)}, the config implies {list(shape)}"
            )
    name = run_dir.name if not tmp else (config.get("recipe") or {}).get("name") or "bulba"
    return Source(
        run_dir=run_dir,
        weights=weights,
        tokenizer_path=tok_path,
        config=config,
        model=cfg,
        tokenizer=tok,
        shapes=want,
        name=name,
        mlflow_run_id=config.get("mlflow_run_id"),
        dtypes={k: header[k][0] for k in want},
        _tmp=tmp,
    )


def load_torch_model(src: Source):
    """The PyTorch reference model (fp32) for verification and HF parity.

    Built on the meta device and given the loaded tensors (assign=True), so memory is one
    copy of the weights, not a random init plus the checkpoint.
    """
    import torch
    from safetensors.torch import load_file

    from bulba.model.llama import Llama, rope_cache

    state = {k: v.float() for k, v in load_file(str(src.weights)).items()}
    with torch.device("meta"):
        model = Llama(src.model)
    model.load_state_dict(state, strict=True, assign=True)
    cos, sin = rope_cache(src.model)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (the RoPE tables) are not in the checkpoint
            if name in ("rope_cos", "rope_sin"):
                model.register_buffer(name, cos if name == "rope_cos" else sin, persistent=False)
            else:  # a buffer we do not know how to rebuild: build the model the plain way
                model = Llama(src.model)
                model.load_state_dict(state, strict=True)
                break
    model.eval()
    return model


def remove_quietly(*paths: os.PathLike | str | None) -> None:
    for p in paths:
        if p:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

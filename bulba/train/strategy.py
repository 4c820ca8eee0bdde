"""The speed modes (train.mode) as a Lightning strategy mixin, composed with DDP and FSDP.

    eager    plain PyTorch; attention through SDPA (torch picks flash / cuDNN / efficient / math)
    flash    the flash-attn package (varlen kernel for packed batches)
    compile  torch.compile (Inductor) on each transformer block
    both     compile + flash

Why a strategy: the strategy is the one place that sees the bare model before it is moved,
wrapped by DDP / FSDP and handed to the loop, which is exactly where the speed modes must be
applied. Compiling the LightningModule itself breaks on `self.log` and on Lightning's
hooks; compiling the blocks (torchtitan style) gives Inductor the whole hot path (norms,
RoPE, attention, SwiGLU) and leaves the embedding, loss and logging eager. `dynamic=False`:
the trainer feeds fixed shapes (batch_size x ctx_len for stream/packed batches, one shape per
bucket for bucketed), so there is one graph per shape and no recompilation in steady state.

On CPU, compiled blocks with a short context use attention written as plain matmuls and a
softmax that Inductor fuses (`MATH_ATTENTION_MAX_CTX`). flash without flash-attn or without
CUDA (this includes every CPU): a warning and SDPA (or that CPU attention) instead, so the
same recipe runs on a laptop and on the cluster; what ran is recorded (`resolved_backend`,
logged as the MLflow tag `bulba.attention_backend`).
"""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from bulba import hardware
from bulba.model import attention
from bulba.model.llama import Block, Llama
from bulba.model.loss import lm_loss_sum

MODES = ("eager", "flash", "compile", "both")

# Compiled blocks on CPU with ctx_len up to this use `attention.math_attention`: Inductor fuses
# its softmax around two oneDNN matmuls. Measured here (2 cores, bf16, B=8, 4 heads / 1 KV head,
# hd 64, forward + backward per layer): 6.6 ms against 12.8 ms for SDPA's CPU kernel at T=256,
# a tie at T=512; beyond that its [T, T] scores only cost memory.
MATH_ATTENTION_MAX_CTX = 256


def flash_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"flash-attn needs a CUDA device (training on {device.type})"
    if not attention.HAVE_FLASH_ATTN:
        return False, "flash-attn is not installed (pip install 'bulbagpt[cuda]')"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, "flash-attn 2 needs an Ampere or newer GPU"
    return True, ""


def apply_speed_mode(model: Llama, mode: str, device: torch.device) -> dict:
    """Set attention backends and compile blocks in place; returns what was applied."""
    if mode not in MODES:
        raise ValueError(f"unknown train.mode {mode!r}")
    backend, reason = "sdpa", "PyTorch SDPA (torch picks the kernel)"
    if mode in ("flash", "both"):
        ok, why = flash_available(device)
        if ok:
            backend, reason = "flash", "flash-attn is installed and the GPU supports it"
        else:
            warnings.warn(f"train.mode={mode}: {why}; using PyTorch attention instead", stacklevel=2)
            reason = f"{why}: PyTorch SDPA instead"
    compiled = mode in ("compile", "both")
    if compiled and backend == "sdpa" and device.type == "cpu" and model.cfg.ctx_len <= MATH_ATTENTION_MAX_CTX:
        backend = "math"
        reason = (
            f"compiled blocks on CPU with ctx_len {model.cfg.ctx_len} <= {MATH_ATTENTION_MAX_CTX}: "
            "matmuls + a softmax that Inductor fuses beat the CPU SDPA kernel"
        )
    for block in model.layers:
        block.attention.backend = backend
    if compiled:
        # Inductor's code cache must not be shared between CPU vector ISAs (bulba.hardware).
        hardware.use_isa_inductor_cache()
        # Every block runs the same code; with dynamo inlining nn.Modules (torch >= 2.5) they
        # share one graph, but on versions that guard on the module instance each block is a
        # recompile: leave room for all of them (the default limit, 8, is below zubr's 12).
        import torch._dynamo.config as dcfg

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 2 * len(model.layers) + 8))
        for block in model.layers:
            if isinstance(block, Block) and getattr(block, "_compiled_call_impl", None) is None:
                # nn.Module.compile compiles in place: parameter names (and so state_dict,
                # checkpoints and final.safetensors) stay exactly as in eager mode.
                block.compile(dynamic=False)
        # the loss head too: output matmul + fp32 log-softmax fused, no stored fp32 logits
        model.loss_head = torch.compile(lm_loss_sum, dynamic=False)
    model.speed = {"mode": mode, "attention": backend, "attention_reason": reason, "compiled": compiled}
    return model.speed


class SpeedModeMixin:
    """Apply `train.mode` to `lightning_module.model` before the parent strategy wraps it."""

    def __init__(self, *args, mode: str = "eager", **kwargs):
        super().__init__(*args, **kwargs)
        self.speed_mode = mode
        self.resolved = None

    def setup(self, trainer) -> None:
        model = self.lightning_module.model
        self.resolved = apply_speed_mode(model, self.speed_mode, self.root_device)
        if trainer.is_global_zero:
            print(f"attention {self.resolved['attention']}: {self.resolved['attention_reason']}", flush=True)
        super().setup(trainer)


class BulbaSingleDeviceStrategy(SpeedModeMixin, SingleDeviceStrategy):
    strategy_name = "bulba_single_device"


class BulbaDDPStrategy(SpeedModeMixin, DDPStrategy):
    strategy_name = "bulba_ddp"


class BulbaFSDPStrategy(SpeedModeMixin, FSDPStrategy):
    strategy_name = "bulba_fsdp"


def make_strategy(kind: str, mode: str, device: torch.device, n_processes: int):
    """Pick the strategy: one device -> single device; several -> DDP unless FSDP is asked for."""
    if kind == "fsdp":
        # Shard at block granularity; use_orig_params keeps parameter names (and our weight
        # decay groups) and is what torch.compile'd blocks need under FSDP.
        return BulbaFSDPStrategy(mode=mode, auto_wrap_policy={Block}, use_orig_params=True, state_dict_type="full")
    if kind == "ddp" or n_processes > 1:
        # gloo on CPU, nccl on CUDA (Lightning's default for the accelerator).
        return BulbaDDPStrategy(mode=mode, find_unused_parameters=False, gradient_as_bucket_view=True)
    return BulbaSingleDeviceStrategy(mode=mode, device=device)

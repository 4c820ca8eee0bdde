"""The speed modes (train.mode): which attention the model is built with, and a Lightning
strategy mixin that compiles it, composed with DDP and FSDP.

    eager    plain PyTorch
    flash    FlashAttention from whichever source is here, best first: the flash-attn package,
             else PyTorch's own (varlen for packed rows, SDPA's flash kernel for stream rows)
    compile  torch.compile (Inductor) on each transformer block
    both     compile + flash

`choose_attention` decides the backend before the model is built (it depends on the device,
its compute capability, the precision, the speed mode, the context and the sampler), so the
model is constructed with it, and nothing is switched on it afterwards. On CUDA, packed and
bucketed rows never take SDPA's dense-mask path in any mode: that path computes every masked
block and cannot use the flash kernel. What was chosen, and why, is printed and logged
(MLflow tags `bulba.attention_backend`, `bulba.attention_reason`).

Why a strategy for compiling: the strategy is the one place that sees the bare model before it
is moved, wrapped by DDP / FSDP and handed to the loop. Compiling the LightningModule itself
breaks on `self.log` and on Lightning's hooks; compiling the blocks (torchtitan style) gives
Inductor the whole hot path (norms, RoPE, attention, SwiGLU) and leaves the embedding, loss and
logging eager. `dynamic=False`: the trainer feeds fixed shapes (batch_size x ctx_len for
stream/packed batches, one shape per bucket for bucketed), and the attention mask built once per
batch has shapes fixed by those (bulba.model.attention), so there is one graph per shape and no
recompilation in steady state.
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

# Compiled blocks on CPU with ctx_len up to this use `attention.Math`: Inductor fuses its
# softmax around two oneDNN matmuls. Measured here (2 cores, bf16, B=8, 4 heads / 1 KV head,
# hd 64, forward + backward per layer): 6.6 ms against 12.8 ms for SDPA's CPU kernel at T=256,
# a tie at T=512; beyond that its [T, T] scores only cost memory.
MATH_ATTENTION_MAX_CTX = 256

HALF_PRECISIONS = ("bf16-mixed", "16-mixed", "bf16-true", "16-true")


def choose_attention(
    mode: str,
    accelerator: str,
    precision: str,
    ctx_len: int,
    sampler: str,
    *,
    capability: tuple[int, int] | None = None,
    have_flash_attn: bool | None = None,
    have_varlen: bool | None = None,
    have_flex: bool | None = None,
) -> hardware.Choice:
    """The attention backend for a run, and why. The keyword arguments default to this machine
    (they exist so the whole table can be checked on a CPU)."""
    if mode not in MODES:
        raise ValueError(f"unknown train.mode {mode!r}")
    want_flash = mode in ("flash", "both")
    compiled = mode in ("compile", "both")
    packed = sampler != "stream"  # packed and bucketed rows carry document boundaries
    if accelerator != "cuda":
        if compiled and ctx_len <= MATH_ATTENTION_MAX_CTX:
            choice = hardware.Choice(
                "math",
                f"compiled blocks on CPU with ctx_len {ctx_len} <= {MATH_ATTENTION_MAX_CTX}: matmuls + a softmax "
                "that Inductor fuses beat the CPU SDPA kernel",
            )
        else:
            choice = hardware.Choice("sdpa", "PyTorch SDPA's CPU kernel" + (" with a document mask" if packed else ""))
        if want_flash:
            return _fallback(mode, "FlashAttention needs a CUDA GPU", choice)
        return choice

    if capability is None:
        capability = torch.cuda.get_device_capability(0)
    have_flash_attn = attention.HAVE_FLASH_ATTN if have_flash_attn is None else have_flash_attn
    have_varlen = attention.HAVE_TORCH_VARLEN if have_varlen is None else have_varlen
    have_flex = attention.HAVE_FLEX if have_flex is None else have_flex
    # FlashAttention-2 (either source): Ampere or newer, and half precision tensors.
    fa_ok = capability[0] >= 8 and precision in HALF_PRECISIONS
    why_not_fa = (
        f"FlashAttention needs an Ampere or newer GPU (this one is sm{capability[0]}{capability[1]})"
        if capability[0] < 8
        else f"FlashAttention needs bf16/fp16 (train.precision is {precision})"
    )
    if want_flash and fa_ok and have_flash_attn:
        return hardware.Choice("flash-attn", "the flash-attn package is installed and the GPU supports it")
    if not packed:
        if fa_ok:
            return hardware.Choice(
                "sdpa", "stream rows (causal, no mask): SDPA runs its FlashAttention-2 kernel (PyTorch's own)"
            )
        choice = hardware.Choice("sdpa", f"stream rows: SDPA (no flash kernel: {why_not_fa})")
        return _fallback(mode, why_not_fa, choice) if want_flash else choice
    if fa_ok and have_varlen:
        return hardware.Choice(
            "varlen",
            "packed rows: PyTorch's varlen FlashAttention with cu_seqlens (torch.nn.attention.varlen)",
        )
    missing = why_not_fa if not fa_ok else f"this torch ({torch.__version__}) has no torch.nn.attention.varlen"
    if have_flex:
        choice = hardware.Choice("flex", f"packed rows: FlexAttention with a block mask ({missing})")
    else:  # pragma: no cover - torch without FlexAttention
        choice = hardware.Choice("sdpa", f"packed rows: SDPA with a dense document mask, the slow path ({missing})")
        warnings.warn(f"attention: {choice.reason}; upgrade torch", stacklevel=2)
        return choice
    return _fallback(mode, missing, choice) if want_flash else choice


def _fallback(mode: str, why: str, choice: hardware.Choice) -> hardware.Choice:
    warnings.warn(f"train.mode={mode}: {why}; using {choice.value} attention instead", stacklevel=3)
    return hardware.Choice(choice.value, f"{choice.reason} (train.mode={mode} asked for FlashAttention: {why})")


def apply_speed_mode(model: Llama, mode: str, device: torch.device) -> dict:
    """Compile the blocks in place for the compile modes; returns what the model runs."""
    if mode not in MODES:
        raise ValueError(f"unknown train.mode {mode!r}")
    compiled = mode in ("compile", "both")
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
    model.speed = {"mode": mode, "attention": model.attend.name, "compiled": compiled}
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

"""Parameter counts, model FLOPs per token and the dense peak tables behind MFU.

MFU = (model FLOPs per token x tokens/s) / peak FLOP/s of the devices in use
(PaLM appendix B): 6 FLOPs per parameter per token for forward + backward of the matmuls,
plus the attention score/value matmuls, 6 * n_layer * T * n_embd per token for causal
attention (half of the 12 * L * T * D of a full T x T square: the causal half is all the
flash kernels compute). The embedding lookup is not a matmul and is left out; the output
projection is counted (tied or not), as it is the largest single matmul of a small model.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

from bulba.config import ModelConfig
from bulba.model.weights import param_count

# Dense (no sparsity) bf16 tensor peak, FLOP/s, per device, with fp32 accumulation (what
# training uses; GeForce cards run it at half their fp16-accumulate rate). Sources: NVIDIA's
# data sheets and architecture whitepapers (Ampere GA102 whitepaper appendix for GeForce 30xx,
# Ada whitepaper appendix for GeForce 40xx; SXM/PCIe parts differ, so the most specific name
# is matched first: "RTX 3060 Ti" before "RTX 3060"). GeForce figures not printed in a
# whitepaper are SMs x boost clock x the architecture's per-SM rate (Ampere GA10x: 512 dense
# fp16/bf16 FLOPs per SM per clock with fp32 accumulate; Ada: the same), marked "derived".
GPU_PEAK_BF16: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 SXM", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 756e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("A6000", 155e12),  # RTX A6000 (dense bf16 with fp32 accumulate ~155 TF)
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX 4090", 165e12),  # Ada whitepaper: 165.2 TF fp16/bf16, fp32 accumulate
    ("RTX 4080 SUPER", 104e12),  # derived: 80 SMs x 2.55 GHz x 512
    ("RTX 4080", 97e12),  # Ada whitepaper: 97.5
    ("RTX 4070 Ti SUPER", 88e12),  # derived: 66 SMs x 2.61 GHz
    ("RTX 4070 Ti", 80e12),  # derived: 60 SMs x 2.61 GHz
    ("RTX 4070 SUPER", 71e12),  # derived: 56 SMs x 2.475 GHz
    ("RTX 4070", 58e12),  # derived: 46 SMs x 2.475 GHz
    ("RTX 4060 Ti", 44e12),  # derived: 34 SMs x 2.535 GHz
    ("RTX 4060", 30e12),  # derived: 24 SMs x 2.46 GHz
    ("RTX 3090 Ti", 80e12),  # derived: 84 SMs x 1.86 GHz
    ("RTX 3090", 71e12),  # GA102 whitepaper: 71 TF
    ("RTX 3080 Ti", 68e12),  # derived: 80 SMs x 1.665 GHz
    ("RTX 3080", 59e12),  # GA102 whitepaper: 59.5 TF
    ("RTX 3070 Ti", 44e12),  # derived: 48 SMs x 1.77 GHz
    ("RTX 3070", 41e12),  # derived: 46 SMs x 1.725 GHz
    ("RTX 3060 Ti", 32e12),  # derived: 38 SMs x 1.665 GHz
    ("RTX 3060", 25.5e12),  # derived: 28 SMs x 1.777 GHz (the seed's 12 GB card)
    ("V100", 125e12),  # fp16 (no bf16 on Volta)
    ("T4", 65e12),  # fp16
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def gpu_peak_flops(name: str) -> float | None:
    for key, peak in GPU_PEAK_BF16:
        if key.lower() in name.lower():
            return peak
    return None


@lru_cache(maxsize=1)
def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_family() -> tuple[str, int] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read(8192)
        vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
        fam = re.search(r"^cpu family\s*:\s*(\d+)", text, re.M)
        if vendor and fam:
            return vendor.group(1), int(fam.group(1))
    except OSError:
        pass
    return None


def _cpu_ghz() -> float:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", f.read(), re.M)]
        if mhz:
            return max(mhz) / 1000.0
    except OSError:
        pass
    return 2.5


def cpu_peak_flops(
    threads: int | None = None, precision: str = "bf16-mixed", measured: bool = True
) -> tuple[float, str]:
    """Rough dense peak of `threads` cores in the precision that runs, and the instruction set.

    MFU must be against the peak of the precision the run actually uses: a fp32 run on a CPU
    whose bf16 peak is twice its fp32 peak would otherwise read half its real utilisation.
    FLOPs per cycle per core: bf16 with AMX tiles 1024, AVX512-BF16 (vdpbf16ps on two 512-bit
    ports) 128; fp32 FMA on two ports: AVX-512 64, AVX2 32. AMD Zen 4 (family 25) runs 512-bit
    ops on 256-bit units: half of those. The clock is the one /proc/cpuinfo reports (nominal;
    boost makes MFU read high). The AMX figure is the data-sheet peak; measured on 2 cores here:
    ~1.7 TFLOP/s, about 40% of it. `measured`: the peak is at least the best matmul rate this
    machine reaches in that precision (bulba.hardware.measured_peak_flops, cached per machine).
    """
    import torch

    n = threads or torch.get_num_threads() or os.cpu_count() or 1
    if measured and n == torch.get_num_threads():
        from bulba.hardware import measured_peak_flops

        table, isa = cpu_peak_flops(threads, precision, measured=False)
        return max(table, measured_peak_flops(precision)), isa
    flags = _cpu_flags()
    from bulba.hardware import cpu_isa

    limit = cpu_isa()  # ATEN_CPU_CAPABILITY can lower the ISA torch uses below the CPU's
    avx512 = "avx512f" in flags and limit.startswith("avx512")
    avx2 = "avx2" in flags and limit in ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx", "zvector") or avx512
    half = 2 if _cpu_family() == ("AuthenticAMD", 25) else 1
    bf16 = precision.startswith("bf16")
    if bf16 and "amx_bf16" in flags and avx512:
        per_cycle, isa = 1024, "amx-bf16"
    elif bf16 and "avx512_bf16" in flags and avx512:
        per_cycle, isa = 128 // half, "avx512-bf16"
    elif avx512:
        per_cycle, isa = 64 // half, "avx512-fp32"
    elif avx2:
        per_cycle, isa = 32, "avx2-fp32"
    else:
        per_cycle, isa = 8, "scalar-fp32"
    return n * _cpu_ghz() * 1e9 * per_cycle, isa


def device_peak_flops(device, precision: str = "bf16-mixed") -> tuple[float, str]:
    """(peak FLOP/s, description) for one torch device in `precision`."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is None:  # unknown GPU: estimate from SMs (Ampere-class: ~1 TF/SM dense bf16)
            props = torch.cuda.get_device_properties(device)
            peak = props.multi_processor_count * 1.0e12
            return peak, f"{name} (estimated)"
        return peak, name
    peak, isa = cpu_peak_flops(precision=precision)
    return peak, f"cpu x{torch.get_num_threads()} ({isa})"


# --------------------------------------------------------------------------- model side


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    T = seq_len or cfg.ctx_len
    matmul_params = param_count(cfg) - cfg.vocab_size * cfg.n_embd * (0 if cfg.tie_embeddings else 1)
    # tied: the embedding matrix is used once as a matmul (the output); untied: the input
    # embedding is a lookup, so drop one V x D. Norm weights are negligible.
    matmul_params -= cfg.n_embd * (2 * cfg.n_layer + 1)
    return 6.0 * matmul_params + 6.0 * cfg.n_layer * T * cfg.n_embd


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def mfu(
    cfg: ModelConfig,
    tokens_per_s: float,
    device="cpu",
    seq_len: int | None = None,
    n_devices: int = 1,
    precision: str = "bf16-mixed",
) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the dense peak of the devices in the
    precision the run uses (on CPU fp32 and bf16 peaks differ; GPUs: the bf16 tensor peak)."""
    peak, _ = device_peak_flops(device, precision)
    return flops_per_token(cfg, seq_len) * tokens_per_s / (peak * n_devices)

"""Choices made by the machine (bulba.hardware): the measured precision probe, its cache, and MFU
against the peak of the precision that runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bulba import hardware
from bulba.config import ModelConfig
from bulba.model import flops
from support.paths import REPO as ROOT

CFG = ModelConfig(vocab_size=2048, n_layer=2, n_embd=256, n_head=4, n_kv_head=1, ffn_hidden=768, ctx_len=64)


def test_explicit_precision_is_kept():
    c = hardware.choose_precision("32-true", "cpu", CFG, 256)
    assert c.value == "32-true" and "recipe" in c.reason


def test_auto_precision_is_measured_cached_and_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = hardware.choose_precision("auto", "cpu", CFG, 256)
    assert first.value in ("bf16-mixed", "32-true")
    cache = json.loads((tmp_path / "bulbagpt" / "precision-probe.json").read_text())
    (entry,) = cache.values()
    if hardware._cpu_bf16_available():
        # the choice follows the measured rates, not the CPU flags
        ratio = entry["fp32"]["seconds"] / entry["bf16"]["seconds"]
        assert (first.value == "bf16-mixed") == (ratio >= hardware.BF16_MARGIN)
        assert "GFLOP/s" in first.reason and hardware.cpu_model() in first.reason
        assert entry["threads"] == torch.get_num_threads() and entry["isa"] == hardware.cpu_isa()
        second = hardware.choose_precision("auto", "cpu", CFG, 256)
        assert second.value == first.value and "cached probe" in second.reason
    else:
        assert first.value == "32-true"


def test_probe_cache_is_per_thread_count(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    n = torch.get_num_threads()
    keys = set()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            keys.add(hardware._probe_key(CFG, 256))
    finally:
        torch.set_num_threads(n)
    assert len(keys) == 2


def test_mfu_uses_the_peak_of_the_precision_that_runs():
    bf16, _ = flops.cpu_peak_flops(threads=1, precision="bf16-mixed")
    fp32, isa = flops.cpu_peak_flops(threads=1, precision="32-true")
    assert fp32 <= bf16 and isa.endswith("fp32")
    m32 = flops.mfu(CFG, 1000.0, "cpu", precision="32-true")
    m16 = flops.mfu(CFG, 1000.0, "cpu", precision="bf16-mixed")
    assert m32 >= m16 > 0


@pytest.mark.skipif(
    not os.path.exists("/proc/cpuinfo") or "avx2" not in open("/proc/cpuinfo").read(),
    reason="needs an x86 CPU with AVX2 (the ISA override below)",
)
def test_peak_follows_the_isa_path_torch_takes():
    code = "from bulba.model import flops; print(flops.cpu_peak_flops(threads=1, precision='32-true')[1])"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "avx2-fp32"


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA GeForce RTX 3060", 25.5e12),
        ("NVIDIA GeForce RTX 3060 Ti", 32e12),
        ("NVIDIA GeForce RTX 4070 Ti SUPER", 88e12),
        ("NVIDIA GeForce RTX 4060", 30e12),
        ("NVIDIA H100 80GB HBM3", 756e12),
    ],
)
def test_consumer_gpus_have_a_peak_and_the_most_specific_name_wins(name, peak):
    assert flops.gpu_peak_flops(name) == peak

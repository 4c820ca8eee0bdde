"""Attention backends against per-document SDPA (the definition of document masking), the
backend each speed mode resolves to, and compile-friendliness (graph breaks, recompiles).

CPU twins: every backend that runs on CPU is checked here on CPU (values and gradients; Flex
forward only, it has no CPU backward). The varlen backend's own logic (flattening, cu_seqlens
padding, GQA, the way back to [B, H, T, hd]) runs on CPU with a per-segment reference kernel
registered as a custom op, exactly the kind of op torch's varlen_attn is. The real CUDA kernels
are the `gpu`-marked tests at the end.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from bulba.config import ModelConfig
from bulba.data.loader import document_layout
from bulba.model import attention
from bulba.model.llama import Llama
from bulba.train.strategy import MATH_ATTENTION_MAX_CTX, apply_speed_mode, choose_attention

B, H, KV, T, HD = 2, 4, 2, 48, 16
# Two rows: documents of 10, 14 (+ padding 0) | 7, 21, 3 and a padding run of 17.
CU = [0, 10, 48, 55, 76, 79, 96]


def per_document_sdpa(q, k, v, cu):
    """The reference: each segment of the flattened batch alone through causal SDPA."""
    Bq, Hq, Tq, hd = q.shape
    out = torch.zeros_like(q)
    for a, b in zip(cu[:-1], cu[1:]):
        row, s, e = a // Tq, a % Tq, a % Tq + (b - a)
        out[row, :, s:e] = F.scaled_dot_product_attention(
            q[row : row + 1, :, s:e],
            k[row : row + 1, :, s:e],
            v[row : row + 1, :, s:e],
            is_causal=True,
            enable_gqa=True,
        )[0]
    return out


def _varlen_reference_impl(q, k, v, offsets, max_seqlen):
    out = torch.zeros_like(q)
    for a, b in zip(offsets[:-1], offsets[1:]):
        if b > a:
            assert b - a <= max_seqlen
            out[a:b] = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, enable_gqa=True
            ).transpose(0, 1)
    return out


@torch.library.custom_op("bulba_test::varlen_reference", mutates_args=())
def varlen_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """CPU stand-in for a varlen kernel's contract: [N, H, hd] / [N, KV, hd] packed tensors,
    causal within each segment of cu (trailing empty segments allowed), GQA. An opaque custom
    op with an opaque backward, as torch's varlen_attn is to torch.compile."""
    return _varlen_reference_impl(q, k, v, cu.tolist(), max_seqlen)


@torch.library.custom_op("bulba_test::varlen_reference_backward", mutates_args=())
def varlen_reference_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention's backward written out per segment (autograd does not run inside an op)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    G = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5
    offsets = cu.tolist()
    for a, b in zip(offsets[:-1], offsets[1:]):
        if b == a:
            continue
        qs, do = q[a:b].transpose(0, 1), grad[a:b].transpose(0, 1)  # [H, n, hd]
        ks, vs = (x[a:b].transpose(0, 1).repeat_interleave(G, dim=0) for x in (k, v))
        scores = (qs @ ks.transpose(-1, -2)) * scale
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        dp = do @ vs.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[a:b] = (ds @ ks * scale).transpose(0, 1)
        dk[a:b] = (ds.transpose(-1, -2) @ qs * scale).unflatten(0, (-1, G)).sum(1).transpose(0, 1)
        dv[a:b] = (p.transpose(-1, -2) @ do).unflatten(0, (-1, G)).sum(1).transpose(0, 1)
    return dq, dk, dv


@varlen_reference.register_fake
def _(q, k, v, cu, max_seqlen):
    return torch.empty_like(q)


@varlen_reference_backward.register_fake
def _(grad, q, k, v, cu, max_seqlen):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu, max_seqlen = inputs
    ctx.save_for_backward(q, k, v, cu)
    ctx.max_seqlen = max_seqlen


def _backward(ctx, grad):
    q, k, v, cu = ctx.saved_tensors
    return (*varlen_reference_backward(grad, q, k, v, cu, ctx.max_seqlen), None, None)


varlen_reference.register_autograd(_backward, setup_context=_setup)


def qkv(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, n, T, HD, generator=g, dtype=dtype).requires_grad_() for n in (H, KV, KV))


def run(backend, q, k, v, cu=CU):
    cu_t = torch.tensor(cu, dtype=torch.int32)
    seq_ids = document_layout(cu_t, B, T)[1]
    return backend(q, k, v, backend.mask(B, T, q.device, seq_ids, cu_t))


def reference_backend(name):
    if name == "varlen":  # torch's kernel is CUDA only: the same backend around a CPU reference
        return attention.Varlen(kernel=varlen_reference)
    return attention.make_backend(name)


@pytest.mark.parametrize("name", ["sdpa", "math", "varlen"])
def test_backend_matches_per_document_sdpa_values_and_grads(name):
    q, k, v = qkv()
    want = per_document_sdpa(q, k, v, CU)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    got = run(reference_backend(name), q, k, v)
    got_grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", ["sdpa", "math", "varlen", "flex"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_backend_stream_rows_are_plain_causal(name):
    q, k, v = (x.detach().float() for x in qkv())
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    backend = reference_backend(name)
    with torch.no_grad():
        got = backend(q, k, v, backend.mask(B, T, q.device))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU: the reference path
def test_flex_forward_matches_per_document_sdpa_on_cpu():
    q, k, v = (x.detach().float() for x in qkv())
    with torch.no_grad():
        got = run(attention.Flex(), q, k, v)
    torch.testing.assert_close(got, per_document_sdpa(q, k, v, CU), atol=2e-5, rtol=2e-5)


def test_pad_segments_gives_few_fixed_lengths_and_keeps_the_offsets():
    for n, size in ((1, 16), (6, 16), (16, 16), (17, 32), (40, 64)):
        cu = torch.arange(n + 1, dtype=torch.int32) * 3
        padded = attention.pad_segments(cu)
        assert padded.numel() == size + 1 and padded.dtype == torch.int32
        assert padded[: n + 1].tolist() == cu.tolist() and set(padded[n:].tolist()) == {3 * n}


def test_segments_of_inverts_document_layout():
    cu = torch.tensor(CU, dtype=torch.int32)
    assert attention.segments_of(document_layout(cu, B, T)[1]).tolist() == CU


def _cfg(**kw):
    base = dict(vocab_size=97, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128, ctx_len=32)
    return ModelConfig(**{**base, **kw})


def test_model_with_varlen_backend_equals_sdpa_model_on_packed_rows():
    """The whole Llama, built with each backend, gives the same logits on a packed batch."""
    torch.manual_seed(0)
    sdpa = Llama(_cfg(ctx_len=T)).double()
    varlen = Llama(_cfg(ctx_len=T), "varlen").double()
    varlen.attend.kernel = varlen_reference  # the varlen backend around the CPU reference kernel
    for layer in varlen.layers:
        assert layer.attention.attend is varlen.attend  # one backend object for every layer
    varlen.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 97, (B, T))
    cu = torch.tensor(CU, dtype=torch.int32)
    pos, seq = document_layout(cu, B, T)
    with torch.no_grad():
        want = sdpa(ids, position_ids=pos, seq_ids=seq, cu_seqlens=cu)
        got = varlen(ids, position_ids=pos, seq_ids=seq, cu_seqlens=cu)
        got_from_seq_ids = varlen(ids, position_ids=pos, seq_ids=seq)  # cu_seqlens derived
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_from_seq_ids, want)


# ----------------------------------------------------------------- which backend each mode gets

GPU = dict(capability=(8, 6), have_flash_attn=False, have_varlen=True, have_flex=True)  # an RTX 3060


@pytest.mark.parametrize(
    "mode, accelerator, precision, ctx, sampler, machine, want",
    [
        ("eager", "cpu", "bf16-mixed", 256, "packed", {}, "sdpa"),
        ("compile", "cpu", "bf16-mixed", MATH_ATTENTION_MAX_CTX, "packed", {}, "math"),
        ("compile", "cpu", "32-true", 2 * MATH_ATTENTION_MAX_CTX, "packed", {}, "sdpa"),
        ("both", "cpu", "bf16-mixed", 256, "stream", {}, "math"),
        ("flash", "cpu", "bf16-mixed", 256, "packed", {}, "sdpa"),
        ("eager", "cuda", "bf16-mixed", 1024, "packed", GPU, "varlen"),
        ("compile", "cuda", "bf16-mixed", 1024, "bucketed", GPU, "varlen"),
        ("both", "cuda", "bf16-mixed", 1024, "packed", GPU, "varlen"),
        ("both", "cuda", "bf16-mixed", 1024, "packed", {**GPU, "have_flash_attn": True}, "flash-attn"),
        ("both", "cuda", "bf16-mixed", 1024, "stream", {**GPU, "have_flash_attn": True}, "flash-attn"),
        ("eager", "cuda", "bf16-mixed", 1024, "packed", {**GPU, "have_flash_attn": True}, "varlen"),
        ("both", "cuda", "bf16-mixed", 1024, "stream", GPU, "sdpa"),
        ("compile", "cuda", "32-true", 1024, "packed", GPU, "flex"),
        ("both", "cuda", "bf16-mixed", 1024, "packed", {**GPU, "capability": (7, 5)}, "flex"),
        ("eager", "cuda", "bf16-mixed", 1024, "packed", {**GPU, "have_varlen": False}, "flex"),
    ],
)
def test_choose_attention_table(mode, accelerator, precision, ctx, sampler, machine, want, recwarn):
    choice = choose_attention(mode, accelerator, precision, ctx, sampler, **machine)
    assert choice.value == want, choice.reason
    assert choice.reason
    # a warning exactly when FlashAttention was asked for and none can run
    no_fa = choice.value not in ("flash-attn", "varlen") and not (
        choice.value == "sdpa" and "FlashAttention-2" in choice.reason
    )
    assert bool([w for w in recwarn if "train.mode" in str(w.message)]) == (mode in ("flash", "both") and no_fa)


def test_packed_rows_on_cuda_never_get_the_dense_mask():
    for mode in ("eager", "flash", "compile", "both"):
        for precision in ("bf16-mixed", "32-true"):
            for cap in ((7, 5), (8, 0), (9, 0)):
                for have_varlen in (False, True):
                    machine = {**GPU, "capability": cap, "have_varlen": have_varlen}
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # the warning itself: test_choose_attention_table
                        got = choose_attention(mode, "cuda", precision, 1024, "packed", **machine)
                    assert got.value in ("varlen", "flex"), (mode, precision, cap, got)


def test_model_is_built_with_its_backend_and_compiling_keeps_it():
    for name in ("math", "sdpa"):
        model = Llama(_cfg(), name)
        assert apply_speed_mode(model, "compile", torch.device("cpu"))["attention"] == name
        assert all(layer.attention.attend is model.attend for layer in model.layers)


# ----------------------------------------------------------------- graph breaks and recompiles


def packed_batches(rows, cols, layouts):
    """(ids, pos, seq_ids, cu) per layout; a layout is each row's document lengths."""
    out = []
    for lengths in layouts:
        cu = [0]
        for row in lengths:
            assert sum(row) == cols
            for n in row:
                cu.append(cu[-1] + n)
        cu = torch.tensor(cu, dtype=torch.int32)
        pos, seq = document_layout(cu, rows, cols)
        out.append((torch.randint(0, 97, (rows, cols)), pos, seq, cu))
    return out


@pytest.mark.parametrize("name", ["math", "sdpa", "varlen"])
def test_compiled_blocks_no_graph_break_and_no_recompile_per_batch(name):
    """Three packed batches with different document layouts (2, 4 and 5 documents) and the
    stream case: one graph per block call shape, no graph break, no recompile after the first."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Llama(_cfg(n_layer=3), name)
    if name == "varlen":
        model.attend.kernel = varlen_reference
    apply_speed_mode(model, "compile", torch.device("cpu"))
    grad = True
    batches = packed_batches(2, 32, [[[20, 12], [32]], [[5, 27], [10, 10, 12]], [[1, 31], [8, 8, 8, 8]]])

    def step(ids, pos, seq, cu):
        with torch.set_grad_enabled(grad):
            h = model.hidden(ids, position_ids=pos, seq_ids=seq, cu_seqlens=cu)
            if grad:
                h.float().square().mean().backward()

    step(*batches[0])
    graphs_after_first = counters["stats"]["unique_graphs"]
    for b in batches[1:]:
        step(*b)
    assert counters["stats"]["unique_graphs"] == graphs_after_first, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    # All blocks share one graph (dynamo inlines nn.Modules): not one per layer.
    assert graphs_after_first <= 2, dict(counters["stats"])
    torch._dynamo.reset()


# ----------------------------------------------------------------- the real CUDA kernels

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_qkv():
    return tuple(x.detach().to("cuda", torch.bfloat16).requires_grad_() for x in qkv(torch.float32))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["sdpa", "varlen", "flex", "flash-attn"])
def test_cuda_backend_matches_per_document_sdpa(name):
    if name == "flash-attn" and not attention.HAVE_FLASH_ATTN:
        pytest.skip("flash-attn is not installed")
    q, k, v = _cuda_qkv()
    want = per_document_sdpa(q.float(), k.float(), v.float(), CU)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    got = run(attention.make_backend(name), q, k, v)
    got_grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.float(), w.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["varlen", "flex"])
def test_cuda_compiled_blocks_no_graph_break_and_no_recompile(name):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = Llama(_cfg(n_layer=3, n_embd=128, n_head=4, n_kv_head=1, ctx_len=256), name).cuda()
    apply_speed_mode(model, "compile", torch.device("cuda"))
    batches = packed_batches(2, 256, [[[200, 56], [256]], [[50, 206], [100, 100, 56]], [[1, 255], [64] * 4]])
    graphs = None
    for ids, pos, seq, cu in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model.hidden(ids.cuda(), position_ids=pos.cuda(), seq_ids=seq.cuda(), cu_seqlens=cu.cuda())
        h.float().square().mean().backward()
        graphs = counters["stats"]["unique_graphs"] if graphs is None else graphs
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"], dict(counters["graph_break"])

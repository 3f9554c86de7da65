"""kernels.py against the float64 references in model.py.

CPU (CI): TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py   (fp32 inputs: the interpreter's
bf16 matmul is not exact). On a GPU the same tests run on CUDA, plus the `gpu` ones at real shapes in bf16:
python -m pytest -q -m gpu tests/test_kernels.py
"""
import os
import re

import pytest
import torch
import torch.nn.functional as F
import triton

import kernels
import model
import spiking
from model import gla_recurrent
from model import spike_quant as spike_quant_ref

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs CUDA or TRITON_INTERPRET=1")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def spy(monkeypatch, name):
    """Calls to kernels.<name> from here on: a list that grows by one per call (the function still runs)."""
    calls, real = [], getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def fullgraph(m):
    """torch.compile(m, fullgraph=True) on aot_eager (dynamo reset first) and the list of graphs it compiles."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    torch._dynamo.reset()
    return torch.compile(m, fullgraph=True, backend=backend), graphs


def rms_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def inputs(B, T, H, K, V, gate=1.0, h0=False, dtype=torch.float32, dev=DEV, g_min=None, seed=0, Hkv=None):
    """q [B, T, H, K]; k, g [B, T, Hkv, K]; v [B, T, Hkv, V] (Hkv = H unless given: GQA); s0 [B, Hkv, K, V]."""
    gen, Hkv = torch.Generator().manual_seed(seed), Hkv or H
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, Hkv, K, generator=gen)
    v = torch.randn(B, T, Hkv, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, Hkv, K, generator=gen) * gate)
    if g_min is not None:
        g = g.clamp_min(g_min)
    s0 = torch.randn(B, Hkv, K, V, generator=gen) if h0 else None
    return [x.to(dev, dtype) for x in (q, k, v, g)], (None if s0 is None else s0.to(dev))


def run_and_grad(fn, q, k, v, g, h0, seed=1, **kw):
    """o, final state and the gradients of a random projection of both, for every input."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g)]
    s0 = None if h0 is None else h0.detach().clone().requires_grad_()
    o, ht = fn(*leaves, initial_state=s0, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    wo, wh = (torch.randn(x.shape, generator=gen).to(x.device) for x in (o, ht))
    grads = torch.autograd.grad((o.float() * wo).sum() + (ht * wh).sum(), leaves + ([s0] if s0 is not None else []))
    return o, ht, grads


def gqa(fn):
    """fn over GQA inputs through one state per query head: k, v, g, h0 repeated per group (gradients summed
    over the copies by autograd), the final state read from the first copy of each group."""
    def wrapped(q, k, v, g, initial_state=None, output_final_state=True, **kw):
        G = q.shape[2] // k.shape[2]
        k, v, g = (x.repeat_interleave(G, 2) for x in (k, v, g))
        h = None if initial_state is None else initial_state.repeat_interleave(G, 1)
        o, st = fn(q, k, v, g, initial_state=h, output_final_state=True, **kw)
        return o, st[:, ::G]
    return wrapped


def reference(q, k, v, g, h0, cu_seqlens=None, **kw):
    """float64 per-step recurrence (GQA: per query head, on repeated k, v, g); a loop over documents when
    cu_seqlens is given."""
    args = [x.double() for x in (q, k, v, g)]
    s0 = None if h0 is None else h0.double()
    if cu_seqlens is None:
        return run_and_grad(gqa(gla_recurrent), *args, s0, **kw)

    def loop(q, k, v, g, initial_state=None, output_final_state=True):
        outs, states = [], []
        for n, (s, e) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            h = None if initial_state is None else initial_state[n:n + 1]
            o, st = gla_recurrent(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], initial_state=h,
                                  output_final_state=True)
            outs.append(o)
            states.append(st)
        return torch.cat(outs, 1), torch.cat(states, 0)
    return run_and_grad(gqa(loop), *args, s0, **kw)


def assert_close(got, want, tol):
    o, ht, grads = got
    ro, rht, rgrads = want
    names = ["o", "final state", "dq", "dk", "dv", "dg", "dh0"]
    for name, a, b in zip(names, [o, ht, *grads], [ro, rht, *rgrads]):
        assert torch.isfinite(a).all(), f"{name} not finite"
        err = rms_err(a, b)
        print(f"{name}: {err:.1e}", end="  ")
        assert err < tol, f"{name}: relative RMS error {err:.2e} >= {tol}"


# ----------------------------------------------------------------------------- chunk_gla

@needs_triton
@pytest.mark.parametrize("T,K,V,h0", [(37, 16, 32, True), (130, 32, 16, False), (130, 16, 16, True)])
def test_chunk_gla_matches_recurrent(T, K, V, h0):
    (q, k, v, g), s0 = inputs(2, T, 3, K, V, gate=0.5, h0=h0, seed=T + K)
    assert_close(run_and_grad(kernels.chunk_gla, q, k, v, g, s0), reference(q, k, v, g, s0), 1e-4)


@needs_triton
@pytest.mark.parametrize("H,Hkv,h0", [(4, 2, True), (6, 1, False)])
def test_chunk_gla_gqa(H, Hkv, h0):
    """GQA: one state per kv head serving H/Hkv query heads, against the per-query-head recurrence on repeated
    k, v, g (outputs, final states, and every gradient, summed over each group)."""
    (q, k, v, g), s0 = inputs(2, 100, H, 16, 32, gate=0.5, h0=h0, seed=H, Hkv=Hkv)
    assert_close(run_and_grad(kernels.chunk_gla, q, k, v, g, s0), reference(q, k, v, g, s0), 1e-4)


def check_gqa_varlen(T, D, cu, seed):
    """chunk_gla over packed documents (cu) with GQA, 4 query heads on 2 kv heads of D, an initial state per
    document: outputs, final states and gradients against the reference recurrence."""
    (q, k, v, g), _ = inputs(1, T, 4, D, D, gate=0.5, seed=seed, Hkv=2)
    cu = torch.tensor(cu, device=DEV)
    s0 = torch.randn(len(cu) - 1, 2, D, D, device=DEV)
    got = run_and_grad(kernels.chunk_gla, q, k, v, g, s0, cu_seqlens=cu)
    assert_close(got, reference(q, k, v, g, s0, cu_seqlens=cu), 1e-4)


@needs_triton
def test_chunk_gla_gqa_varlen():
    check_gqa_varlen(90, 16, [0, 30, 31, 90], seed=13)


@needs_triton
@pytest.mark.parametrize("split", [False, True])
def test_chunk_gla_forward_state_pass(monkeypatch, split):
    """The forward's state pass both ways (chunk terms in parallel then a serial pass, or one kernel), with state
    blocks smaller than the head (several programs per state), packed documents and GQA."""
    monkeypatch.setitem(kernels.CONFIG, "split_scan", split)
    monkeypatch.setitem(kernels.CONFIG, "state_bk", 16)
    monkeypatch.setitem(kernels.CONFIG, "state_bv", 16)
    check_gqa_varlen(200, 32, [0, 64, 65, 200], seed=21)


def too_big(kernel, setting, value, need):
    """A Triton kernel as a GPU with less shared memory would launch it: `kernel[grid](...)` raises OutOfResources
    (needing `need` bytes) when its launch setting is `value`, and runs as usual otherwise."""
    from triton.runtime.errors import OutOfResources

    class TooBig:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw[setting] == value:
                    raise OutOfResources(need, 232448, "shared memory")
                return kernel[grid](*args, **kw)
            return launch
    return TooBig()


@needs_triton
def test_launch_settings_that_do_not_fit_fall_back(monkeypatch):
    """A launch that runs out of GPU resources under CONFIG (here: its 64-wide blocks) reruns under SAFE_CONFIG with
    one warning, remembered per device; the result is still exact."""
    import warnings

    monkeypatch.setattr(kernels, "_chunk_kernel", too_big(kernels._chunk_kernel, "BK", 64, 233528))
    monkeypatch.setattr(kernels, "options_failed", set())
    (q, k, v, g), s0 = inputs(1, 70, 2, 64, 64, gate=0.5, h0=True, seed=5)
    with pytest.warns(UserWarning, match="chunk_gla forward: kernel options .* do not compile"):
        got = run_and_grad(kernels.chunk_gla, q, k, v, g, s0)
    assert_close(got, reference(q, k, v, g, s0), 1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # remembered: no second warning, no second failed launch
        kernels.chunk_gla(q, k, v, g, initial_state=s0)


def test_with_fallback_only_catches_resource_errors():
    calls = []

    def call(opts):
        calls.append(opts)
        if opts == {"big": 1}:
            raise RuntimeError("InductorError: No valid triton configs. OutOfResources: shared memory")
        if opts == {"bad": 1}:
            raise ValueError("a real bug")
        return opts

    failed = set()
    kernels.options_failed, saved = failed, kernels.options_failed
    try:
        with pytest.warns(UserWarning, match="flex: kernel options"):
            assert kernels.with_fallback(call, {"big": 1}, "k1", "flex") is None
        assert kernels.with_fallback(call, {"big": 1}, "k1", "flex") is None and calls == [{"big": 1}, None, None]
        with pytest.raises(ValueError, match="a real bug"):
            kernels.with_fallback(call, {"bad": 1}, "k2", "flex")
        assert failed == {"k1"}
    finally:
        kernels.options_failed = saved


def test_compiled_inside_a_compiled_block_adds_no_guard(monkeypatch, dynamo_config):
    """kernels.compiled traced into a compiled graph (flex in a compiled block on CUDA) gives fn itself: a function
    compiled later (the loss's pass) must not recompile the graph (limit 1 here: a recompile fails)."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(kernels, "_compiled", {})
    dynamo_config(recompile_limit=1, fail_on_recompile_limit_hit=True)
    torch._dynamo.reset()

    def inner(x):
        return x.sin()

    def other(x):
        return x.cos()
    block = torch.compile(lambda x: kernels.compiled(inner)(x + 1) * 2)
    x = torch.randn(4)
    try:
        block(x)
        kernels.compiled(other)(x)
        torch.testing.assert_close(block(x), (x + 1).sin() * 2)
    finally:
        torch._dynamo.reset()


@needs_triton
def test_chunk_gla_groups(monkeypatch):
    """Two reference points per chunk (CONFIG groups=2), as used for gates with faster decay."""
    monkeypatch.setitem(kernels.CONFIG, "groups", 2)
    (q, k, v, g), s0 = inputs(1, 100, 2, 16, 16, gate=1.0, h0=True, seed=3)
    assert_close(run_and_grad(kernels.chunk_gla, q, k, v, g, s0), reference(q, k, v, g, s0), 1e-4)


@needs_triton
def test_chunk_gla_strong_decay():
    """Gates down to -30 per step: chunks take the exact pairwise path; nothing overflows."""
    (q, k, v, g), s0 = inputs(1, 80, 2, 16, 16, gate=10.0, h0=True, g_min=-30.0, seed=4)
    assert g.min() < -25
    got = run_and_grad(kernels.chunk_gla, q, k, v, g, s0)
    assert_close(got, reference(q, k, v, g, s0), 1e-4)


@needs_triton
def test_chunk_gla_mixed_paths(monkeypatch):
    """A low MAX_EXP sends some chunks down the pairwise path and keeps others fast, in one launch."""
    monkeypatch.setattr(kernels, "MAX_EXP", 20.0)
    (q, k, v, g), s0 = inputs(1, 130, 2, 16, 16, gate=1.0, seed=5)
    g[:, 64:] = g[:, 64:] * 0.05                                   # chunks 1, 2: weak decay, fast path
    assert_close(run_and_grad(kernels.chunk_gla, q, k, v, g, s0), reference(q, k, v, g, s0), 1e-4)


@needs_triton
def test_chunk_gla_varlen_equals_loop():
    (q, k, v, g), s0 = inputs(1, 150, 2, 16, 32, gate=0.5, seed=6)
    cu = torch.tensor([0, 5, 70, 71, 150], device=DEV)
    s0 = torch.randn(4, 2, 16, 32, device=DEV)
    got = run_and_grad(kernels.chunk_gla, q, k, v, g, s0, cu_seqlens=cu)
    assert_close(got, reference(q, k, v, g, s0, cu_seqlens=cu), 1e-4)
    # and the same as calling the kernel once per document
    for n in range(4):
        s, e = cu[n].item(), cu[n + 1].item()
        o, ht = kernels.chunk_gla(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], initial_state=s0[n:n + 1],
                                  output_final_state=True)
        assert rms_err(got[0][:, s:e], o) < 1e-6 and rms_err(got[1][n:n + 1], ht) < 1e-6


@needs_triton
def test_chunk_gla_fp16_and_defaults():
    (q, k, v, g), _ = inputs(2, 40, 2, 32, 32, gate=0.5, seed=7)
    o, ht = kernels.chunk_gla(q.half(), k.half(), v.half(), g.half(), scale=0.3)
    assert o.dtype == torch.float16 and ht is None
    ro, _ = gla_recurrent(*(x.half().double() for x in (q, k, v, g)), scale=0.3)
    assert rms_err(o, ro) < 3e-3


# ----------------------------------------------------------------------------- fused_recurrent_gla

@needs_triton
@pytest.mark.parametrize("varlen", [False, True])
def test_fused_recurrent_matches_recurrent(varlen):
    (q, k, v, g), s0 = inputs(3, 2, 2, 32, 16, gate=1.0, h0=True, seed=8)
    cu = None
    if varlen:
        q, k, v, g = (x.reshape(1, 6, *x.shape[2:]) for x in (q, k, v, g))
        cu = torch.tensor([0, 1, 4, 6], device=DEV)
    o, ht = kernels.fused_recurrent_gla(q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    ro, rht, _ = reference(q, k, v, g, s0, cu_seqlens=cu)
    assert rms_err(o, ro) < 1e-5 and rms_err(ht, rht) < 1e-5
    with pytest.raises(RuntimeError, match="no backward"):
        kernels.fused_recurrent_gla(q.requires_grad_(), k, v, g, cu_seqlens=cu)


@needs_triton
def test_fused_recurrent_gqa():
    (q, k, v, g), s0 = inputs(2, 3, 6, 16, 32, gate=1.0, h0=True, seed=14, Hkv=2)
    o, ht = kernels.fused_recurrent_gla(q, k, v, g, initial_state=s0, output_final_state=True)
    ro, rht, _ = reference(q, k, v, g, s0)
    assert o.shape == q.shape[:3] + (32,) and ht.shape == (2, 2, 16, 32)
    assert rms_err(o, ro) < 1e-5 and rms_err(ht, rht) < 1e-5


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_before_launch():
    (q, k, v, g), _ = inputs(1, 8, 2, 16, 16, dev="cpu")
    with pytest.raises(ValueError, match="shape"):
        kernels.chunk_gla(q, k[:, :4], v, g)
    with pytest.raises(ValueError, match="shape"):
        kernels.chunk_gla(q, k, v[:, :, :1], g)
    with pytest.raises(TypeError, match="dtype"):
        kernels.chunk_gla(q, k.double(), v, g)
    with pytest.raises(TypeError, match="dtype"):
        kernels.chunk_gla(q.double(), k.double(), v.double(), g.double())
    with pytest.raises(ValueError, match="device"):
        kernels.chunk_gla(q, k, v, g.to("meta"))
    q24 = torch.randn(1, 8, 2, 24)
    with pytest.raises(ValueError, match="head dim"):
        kernels.chunk_gla(q24, q24, v, q24)
    with pytest.raises(ValueError, match="initial_state"):
        kernels.chunk_gla(q, k, v, g, initial_state=torch.zeros(2, 2, 16, 16))
    with pytest.raises(ValueError, match="initial_state"):      # GQA: one state per kv head, not per query head
        kernels.chunk_gla(torch.randn(1, 8, 4, 16), k, v, g, initial_state=torch.zeros(1, 4, 16, 16))
    for cu in ([1, 8], [0, 5, 5, 8], [0, 9], [0, 6, 3, 8]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            kernels.chunk_gla(q, k, v, g, cu_seqlens=torch.tensor(cu))
    with pytest.raises(ValueError, match="cu_seqlens"):
        kernels.chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0.0, 8.0]))
    q2 = torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match="batch size"):
        kernels.chunk_gla(q2, q2, q2, q2, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="shape"):
        kernels.fused_recurrent_gla(q, k, v, g[..., :8])
    q3 = torch.randn(1, 8, 3, 16)
    with pytest.raises(ValueError, match="Hkv dividing H"):
        kernels.chunk_gla(q3, k, v, g)                            # 2 kv heads cannot serve 3 query heads


def test_bench_profile_counts_every_gla_kernel():
    """bench.py profile groups device time by kernel name: every Triton kernel of kernels.py is a GLA kernel,
    except the decode attention kernel (softmax attention), the spike GEMM and the 8-bit GEMVs (matmuls: INT8
    or e4m3 weights) and the one-row spike counts."""
    import bench
    names = [n for n in dir(kernels) if n.endswith("_kernel")]
    others = {"_decode_attention_kernel": "softmax attention", "_spike_gemm_kernel": "matmul",
              "_gemv8_kernel": "matmul", "_gemv_row_kernel": "matmul", "_gemv_rows_kernel": "matmul",
              "_spike_counts_kernel": "spike counts"}
    kinds = {n: others.get(n, "GLA kernels") for n in names}
    assert len(names) >= 5 and all(bench.kind_of(n) == kind for n, kind in kinds.items()), names


# ----------------------------------------------------------------------------- spike quantization

@pytest.mark.parametrize("shape", [(3, 5, 300), (4, 4096 + 7)])
def test_spike_quant_matches_reference(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(9)).to(DEV) * 3
    counts, vth = kernels.spike_quant(x, 3.0)
    rc, rv = spike_quant_ref(x, 3.0)
    assert torch.allclose(vth, rv, rtol=1e-6, atol=0)
    assert (counts != rc).float().mean() < 1e-4                     # ulp-level threshold ties only
    c8, v8 = kernels.spike_quant(x.pow(3), 100.0, int8=True)
    assert c8.dtype == torch.int8 and c8.abs().max() == 127
    assert torch.equal(c8, torch.round(x.pow(3) / v8).clamp(-127, 127).to(torch.int8))


def test_spike_quant_ties_to_even_and_clamps():
    x = torch.tensor([[0.5, 1.5, 2.5, -2.5, -0.5, 3.0]], device=DEV)
    counts, vth = kernels.spike_quant(x, x.abs().mean().item())       # vth = 1 exactly
    assert vth.item() == 1.0 and counts.tolist() == [[0.0, 2.0, 2.0, -2.0, -0.0, 3.0]]
    assert kernels.spike_quant(torch.zeros(2, 8, device=DEV))[1].eq(1e-5).all()
    assert kernels.spike_quant(torch.full((1, 8), 1e6, device=DEV))[1].eq(1e4).all()


# ----------------------------------------------------------------------------- GPU, real shapes

@gpu
@needs_cuda
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_bf16_real_shapes(D):
    (q, k, v, g), s0 = inputs(2, 2048 + 13, 4, D, D, gate=1.0, h0=True, seed=10, dtype=torch.bfloat16)
    g = (g.float() / 16).bfloat16()                                 # the model's gate normalizer
    got = run_and_grad(kernels.chunk_gla, q, k, v, g, s0)
    want = run_and_grad(gla_recurrent, *(x.float() for x in (q, k, v, g)), s0)
    assert_close(got, want, 2e-2)


@gpu
@needs_cuda
def test_gpu_bf16_gqa_model_shapes():
    """SpikingBrain-7B's GLA: 28 query heads over 4 kv heads, D = 128, gates / 16."""
    (q, k, v, g), s0 = inputs(1, 2048 + 13, 28, 128, 128, gate=1.0, h0=True, seed=15, dtype=torch.bfloat16, Hkv=4)
    g = (g.float() / 16).bfloat16()
    got = run_and_grad(kernels.chunk_gla, q, k, v, g, s0)
    want = run_and_grad(gqa(gla_recurrent), *(x.float() for x in (q, k, v, g)), s0)
    assert_close(got, want, 2e-2)


@gpu
@needs_cuda
def test_gpu_bf16_varlen_and_strong_decay():
    (q, k, v, g), s0 = inputs(1, 3000, 4, 128, 128, gate=10.0, g_min=-30.0, seed=11, dtype=torch.bfloat16)
    cu = torch.tensor([0, 1, 700, 2000, 2999, 3000], device=DEV)
    got = run_and_grad(kernels.chunk_gla, q, k, v, g, None, cu_seqlens=cu)
    want = reference(*(x.float() for x in (q, k, v, g)), None, cu_seqlens=cu)
    assert_close(got, want, 2e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("gate_norm", [1.0, 16.0])
def test_gpu_matches_fla(gate_norm):
    """Needs flash-linear-attention; its first call autotunes for minutes."""
    fla = pytest.importorskip("fla.ops.gla")
    (q, k, v, g), s0 = inputs(1, 4096 + 100, 8, 128, 128, gate=1.0, h0=True, seed=12, dtype=torch.bfloat16)
    g = (g.float() / gate_norm).bfloat16()
    ours = run_and_grad(kernels.chunk_gla, q, k, v, g, s0)
    theirs = run_and_grad(fla.chunk_gla, q, k, v, g, s0)
    want = run_and_grad(gla_recurrent, *(x.float() for x in (q, k, v, g)), s0)
    for got in (ours, theirs):
        assert_close(got, want, 2e-2)
    assert_close(ours, theirs, 2e-2)


@gpu
@needs_cuda
def test_gpu_spike_quant_bf16():
    x = torch.randn(4096, 3584, device="cuda", dtype=torch.bfloat16)
    counts, vth = kernels.spike_quant(x, 3.0)                       # the torch.compile path
    rc, rv = spike_quant_ref(x, 3.0)
    assert torch.allclose(vth, rv, rtol=1e-5, atol=0) and (counts != rc).float().mean() < 1e-5


def decode_reference(q, k, v, bias, scale=None):
    """float64 softmax over the visible slots, the query heads of kv head j = the j-th group of H/Hkv."""
    G = q.shape[1] // k.shape[2]
    k, v = (x.double().repeat_interleave(G, 2) for x in (k, v))                     # [B, S, H, D]
    s = torch.einsum("bhd,bshd->bhs", q.double(), k) * (scale or q.shape[-1] ** -0.5) + bias.double()[:, None]
    return torch.einsum("bhs,bshd->bhd", s.softmax(-1), v)


@needs_triton
@pytest.mark.parametrize("H,Hkv,S,splits", [(4, 4, 37, None), (7, 1, 200, 3), (6, 2, 130, 64), (8, 2, 64, 1)])
def test_decode_attention_matches_float64(H, Hkv, S, splits):
    gen = torch.Generator().manual_seed(S)
    B, D = 2, 32
    q = torch.randn(B, H, D, generator=gen)
    k, v = torch.randn(B, S, Hkv, D, generator=gen), torch.randn(B, S, Hkv, D, generator=gen)
    hidden = torch.rand(B, S, generator=gen) < 0.3
    hidden[:, 0] = False                                        # every row sees at least one slot
    hidden[1, 5:100] = True                                     # whole splits of row 1 hidden
    bias = torch.zeros(B, S).masked_fill(hidden, float("-inf"))
    q, k, v, bias = (x.to(DEV) for x in (q, k, v, bias))
    o = kernels.decode_attention(q, k, v, bias, splits=splits)
    assert o.shape == (B, H, D) and o.dtype == q.dtype
    assert rms_err(o, decode_reference(q, k, v, bias)) < 1e-5


@needs_triton
def test_decode_attention_reads_the_cache_layout_in_place():
    """k, v as slices of a bigger cache buffer (strided along S and heads), a scale, one visible slot."""
    gen = torch.Generator().manual_seed(1)
    buf = torch.randn(2, 3, 90, 4, 16, generator=gen)                            # [kv, B, S, Hkv, D]
    k, v = buf[0, :, :80, 1:3], buf[1, :, :80, 1:3]                            # [3, 80, 2, 16], not contiguous
    q = torch.randn(3, 4, 16, generator=gen)
    bias = torch.full((3, 80), float("-inf"))
    bias[:, 41] = 0.0
    bias[0] = 0.0
    q, k, v, bias = (x.to(DEV) for x in (q, k, v, bias))
    o = kernels.decode_attention(q, k, v, bias, scale=0.3)
    assert rms_err(o, decode_reference(q, k, v, bias, scale=0.3)) < 1e-5
    assert torch.allclose(o[1:], v[1:, 41].repeat_interleave(2, 1), atol=1e-6)   # one slot: its value


def test_decode_attention_bad_inputs():
    q, k = torch.zeros(1, 6, 32), torch.zeros(1, 10, 4, 32)
    with pytest.raises(ValueError, match="Hkv dividing H"):
        kernels.decode_attention(q, k, k, torch.zeros(1, 10))
    with pytest.raises(ValueError, match="bias"):
        kernels.decode_attention(q[:, :4], k, k, torch.zeros(1, 9))
    with pytest.raises(ValueError, match="head dim"):
        kernels.decode_attention(q[:, :4, :24], k[..., :24], k[..., :24], torch.zeros(1, 10))


@gpu
@needs_cuda
@pytest.mark.parametrize("B,S", [(1, 4097), (8, 4097), (1, 131072)])
def test_gpu_decode_attention_bf16_model_shapes(B, S):
    """The 7B's decode attention (28 query / 4 kv heads of 128) over an SWA ring or a long full-attention cache
    with empty slots, bf16, against float64."""
    gen = torch.Generator().manual_seed(S)
    q = torch.randn(B, 28, 128, generator=gen).cuda().bfloat16()
    k, v = (torch.randn(B, S, 4, 128, generator=gen).cuda().bfloat16() for _ in range(2))
    bias = torch.zeros(B, S, device="cuda")
    bias[:, S - S // 3:] = float("-inf")                          # a cache not yet full
    o = kernels.decode_attention(q, k, v, bias)
    assert rms_err(o.float(), decode_reference(q, k, v, bias).float()) < 1e-2


# ----------------------------------------------------------------------------- spike counts on 8-bit tensor cores

SMALL_TILES = dict(BM=16, BN=32, BK=32, GROUP_M=2, num_warps=4, num_stages=1)   # many tiles, wrapped edges


def spike_operands(M, K, N, group_size, seed=0):
    """Full-range int8 counts [M, K] and weights [N, K], vth [M, 1], scales [N, G], bias [N]."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(-128, 128, (M, K), generator=gen).to(torch.int8)
    qweight = torch.randint(-127, 128, (N, K), generator=gen).to(torch.int8)
    scales = torch.rand(N, -(-K // group_size), generator=gen) * 0.02 + 1e-3
    vth = torch.rand(M, 1, generator=gen) + 0.05
    return [x.to(DEV) for x in (counts, vth, qweight, scales, torch.randn(N, generator=gen))]


def assert_spike_exact(y, counts, vth, qweight, scales, group_size, bias):
    """y against float64 of the same operands, within spike_linear's stated bound: (2P + 2) 2^-24 times the sum of
    the magnitudes, P = pieces per row (here counted for the narrowest pieces, 32 channels)."""
    K = counts.shape[1]
    P = -(-K // group_size) * -(-min(group_size, K) // 32)
    want = kernels.spike_linear_torch(counts, vth, qweight, scales, group_size, bias, torch.float64)
    mag = kernels.spike_linear_torch(counts.abs(), vth, qweight.abs(), scales.abs(), group_size,
                                     None if bias is None else bias.abs(), torch.float64)
    err = (y.double() - want).abs()
    assert y.shape == want.shape and (err <= (2 * P + 2) * 2.0 ** -24 * mag).all(), err.max().item()


@needs_triton
@pytest.mark.parametrize("K,tiles,bias", [(200, None, True), (200, SMALL_TILES, False), (128, SMALL_TILES, True),
                                          (128, None, False)])
def test_spike_linear_matches_float64(monkeypatch, K, tiles, bias):
    """K = 200: a group of 128 and a partial one of 72 (masked); K = 128: one whole group. Default and small tiles
    (several row and column tiles, grouped order, rows and columns past the edge)."""
    if tiles:
        monkeypatch.setattr(kernels, "SPIKE_GEMM_SAFE", tiles)
    counts, vth, qweight, scales, b = spike_operands(37, K, 48, 128, seed=K)
    b = b if bias else None
    y = kernels.spike_linear(counts, vth, qweight, scales, 128, b)
    assert y.dtype == torch.float32
    assert_spike_exact(y, counts, vth, qweight, scales, 128, b)
    assert kernels.spike_linear(counts, vth, qweight, scales, 128, b, out_dtype=torch.float16).dtype == torch.float16


@needs_triton
@pytest.mark.parametrize("group_size", [48, 16, 1000])
def test_spike_linear_other_group_widths(group_size):
    """Groups narrower than a piece (48: pieces of 64, the last group 8 wide; 16: below int8's 32 channels) and one
    group wider than K."""
    counts, vth, qweight, scales, b = spike_operands(21, 200, 40, group_size, seed=group_size)
    y = kernels.spike_linear(counts, vth, qweight, scales, group_size, b)
    assert_spike_exact(y, counts, vth, qweight, scales, group_size, b)


@needs_triton
@pytest.mark.parametrize("K", [128, 200])
def test_spike_linear_int8_extremes_are_exact(K):
    """Every count and weight at the int8 edge (-128, +-127): each group's sum is as large as the kernel allows
    (128 * 128 * 127), and with unit scales and thresholds the output is the int64 product, bit for bit."""
    gen = torch.Generator().manual_seed(K)
    counts = torch.where(torch.rand(19, K, generator=gen) < 0.5, -128, 127).to(torch.int8)
    counts[0] = -128                                                    # a row of -128 x -127: the largest sums
    qweight = torch.where(torch.rand(33, K, generator=gen) < 0.5, -127, 127).to(torch.int8)
    qweight[0] = -127
    want = counts.long() @ qweight.long().T
    assert want[0, 0] == K * 128 * 127
    y = kernels.spike_linear(counts.to(DEV), torch.ones(19, 1, device=DEV), qweight.to(DEV),
                             torch.ones(33, -(-K // 128), device=DEV), 128)
    assert torch.equal(y.cpu().double(), want.double())


def wide_rows(D=200):
    """x [6, D] whose spike counts at k = 3 peak at 127, 128, -128, -127 (one channel v over D - 1 ones:
    count = round(3 D v / (D - 1 + v))), then a Gaussian row and a row with a huge outlier."""
    x = torch.ones(6, D)
    x[:4, 7] = torch.tensor([53.4, 54.0, -54.0, -53.4])
    x[4] = torch.randn(D, generator=torch.Generator().manual_seed(0))
    x[5, 11] = 5000.0
    return x


@needs_triton
def test_w8aspike_linear_routes_counts_past_int8_to_the_float_path(monkeypatch):
    """Rows whose counts do not fit int8 (128, -128, ~595) are recomputed exactly from their counts; the others
    (127, -127 included) come from the kernel; nothing saturates."""
    monkeypatch.setattr(kernels, "SPIKE_GEMM_SAFE", SMALL_TILES)
    x = wide_rows().to(DEV)
    counts, vth = spike_quant_ref(x, 3.0)
    assert counts[:4, 7].tolist() == [127, 128, -128, -127] and counts[5].abs().max() > 500
    c8, v8, wide = kernels.spike_counts_int8(x, 3.0)
    assert wide.tolist() == [False, True, True, False, False, True] and torch.allclose(v8, vth, rtol=1e-6, atol=0)
    assert torch.equal(c8, counts.clamp(-127, 127).to(torch.int8))
    _, _, qweight, scales, b = spike_operands(6, 200, 48, 128, seed=3)
    y = kernels.w8aspike_linear(x, qweight, scales, 128, 3.0, b)
    assert_spike_exact(y, counts, vth, qweight, scales, 128, b)
    saturated = kernels.spike_linear_torch(c8, v8, qweight, scales, 128, b)
    assert rms_err(saturated[5], y[5]) > 0.1                     # clamping the outlier would have been wrong


@needs_triton
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=[gpu, needs_cuda])])
def test_w8aspike_linear_compiles_in_one_graph(monkeypatch, backend):
    """No graph break (fullgraph): the spike quantization stays in the compiled block's graph (inductor fuses it
    into the pass before it), the kernel launch and the host read of the wide rows run inside the ops
    _spike_gemm_into and _w8_wide_rows, which still recompute a row with a count past 127 exactly. aot_eager: equal
    to eager bit for bit (no code generation); inductor (GPU): its fused quantization may round a count the other
    way at a half, so equal within the kernel's bound plus one count's worth."""
    monkeypatch.setattr(kernels, "SPIKE_GEMM_SAFE", SMALL_TILES)
    x = torch.cat([torch.randn(31, 200, generator=torch.Generator().manual_seed(4)), wide_rows()]).to(DEV)
    _, _, qweight, scales, b = spike_operands(37, 200, 48, 128, seed=5)

    def f(x):
        return kernels.w8aspike_linear(torch.nn.functional.silu(x) * 2, qweight, scales, 128, 3.0, b)
    counts, vth = spike_quant_ref(torch.nn.functional.silu(x) * 2, 3.0)
    assert (counts.abs().amax(-1) > 127).sum() >= 1                  # a row the kernel cannot take
    with torch.no_grad():
        want = f(x)
        torch._dynamo.reset()
        y = torch.compile(f, fullgraph=True, backend=backend)(x)
    if backend == "aot_eager":
        assert torch.equal(y, want)
        assert_spike_exact(y, counts, vth, qweight, scales, 128, b)
    else:
        one_count = kernels.spike_linear_torch(torch.ones_like(counts), vth, qweight.abs(), scales, 128)
        assert ((y.double() - want.double()).abs() <= 2 * one_count.abs().amax(-1, keepdim=True) + 1e-3).all()


@needs_triton
def test_w8aspike_module_through_the_kernel_equals_the_reference(monkeypatch):
    """spiking.W8ASpikeLinear's forward with the kernel forced (as on CUDA) against its float reference path (as on
    CPU): a partial last group, a bias, a token with counts past int8; gradients and spike_k=None keep the float
    path."""
    from spiking import W8ASpikeLinear
    torch.manual_seed(0)
    m = W8ASpikeLinear.from_linear(torch.nn.Linear(200, 48), group_size=128, spike_k=3.0).to(DEV)
    x = torch.cat([torch.randn(37, 200), wide_rows()]).view(1, 43, 200).to(DEV) * 0.7
    monkeypatch.setattr(kernels, "SPIKE_GEMM_SAFE", SMALL_TILES)
    calls = spy(monkeypatch, "spike_linear")
    monkeypatch.setattr(kernels, "SPIKE_GEMM_IMPL", "triton")
    with torch.no_grad():
        fast = m(x)
    assert calls and fast.shape == (1, 43, 48) and fast.dtype == x.dtype
    counts, vth = spike_quant_ref(x[0], 3.0)
    assert_spike_exact(fast[0], counts, vth, m.qweight, m.scales, 128, m.bias)
    monkeypatch.setattr(kernels, "SPIKE_GEMM_IMPL", "torch")
    ref = m(x)
    assert rms_err(fast, ref) < 1e-6
    monkeypatch.setattr(kernels, "SPIKE_GEMM_IMPL", "triton")
    calls.clear()
    assert torch.allclose(m(x.requires_grad_()), ref) and not calls          # autograd: the float path
    m.spike_k = None
    with torch.no_grad():
        m(x)
    assert not calls                                                         # no spikes: the float path


@needs_triton
def test_spike_linear_tiles_that_do_not_fit_fall_back(monkeypatch):
    """The device's tiles (here a table entry for the CPU) fail to compile: one warning, SPIKE_GEMM_SAFE, exact."""
    import warnings

    monkeypatch.setattr(kernels, "_spike_gemm_kernel", too_big(kernels._spike_gemm_kernel, "BM", 128, 262144))
    monkeypatch.setattr(kernels, "options_failed", set())
    device_key = torch.cuda.get_device_capability() if CUDA else "cpu"
    monkeypatch.setattr(kernels, "SPIKE_GEMM_CONFIGS", {device_key: dict(SMALL_TILES, BM=128)})
    counts, vth, qweight, scales, b = spike_operands(37, 200, 48, 128, seed=7)
    with pytest.warns(UserWarning, match="spike_linear: kernel options .* do not compile"):
        y = kernels.spike_linear(counts, vth, qweight, scales, 128, b)
    assert_spike_exact(y, counts, vth, qweight, scales, 128, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # remembered: no second warning
        kernels.spike_linear(counts, vth, qweight, scales, 128, b)


def test_spike_linear_bad_inputs():
    counts, vth, qweight, scales, b = spike_operands(4, 200, 8, 128)
    with pytest.raises(TypeError, match="int8"):
        kernels.spike_linear(counts.float(), vth, qweight, scales, 128)
    with pytest.raises(ValueError, match="share K"):
        kernels.spike_linear(counts[:, :100], vth, qweight, scales, 128)
    with pytest.raises(ValueError, match=r"G=4\] \(K=200 in groups of 64\)"):
        kernels.spike_linear(counts, vth, qweight, scales, 64)
    with pytest.raises(ValueError, match="vth"):
        kernels.spike_linear(counts, vth[:, 0], qweight, scales, 128)
    with pytest.raises(ValueError, match="positive int"):
        kernels.spike_linear(counts, vth, qweight, scales, 0)


@gpu
@needs_cuda
def test_gpu_spike_linear_7b_shape():
    """A 7B-like projection (M=256 tokens, K=3584, N=512) from bf16 activations, two tokens with counts past int8:
    the kernel's fp32 output within its bound of float64 on the same int8 operands, and W8ASpikeLinear's bf16
    output (the CUDA path) within bf16 rounding of float64 on the exact counts."""
    from spiking import W8ASpikeLinear
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3584, generator=gen)
    x[[3, 200], [5, 7]] = torch.tensor([300.0, -900.0])
    x = x.cuda().bfloat16()
    m = W8ASpikeLinear.from_linear(torch.nn.Linear(3584, 512), group_size=128, spike_k=3.0).cuda()
    counts, vth, wide = kernels.spike_counts_int8(x, 3.0)
    assert wide.sum() == 2
    y = kernels.spike_linear(counts, vth, m.qweight, m.scales, 128, m.bias)
    assert_spike_exact(y, counts, vth, m.qweight, m.scales, 128, m.bias)
    with torch.no_grad():
        out = m(x)
    rc, rv = spike_quant_ref(x, 3.0)
    want = kernels.spike_linear_torch(rc, rv, m.qweight, m.scales, 128, m.bias, torch.float64)
    assert out.dtype == torch.bfloat16 and rms_err(out, want) < 4e-3


# ----------------------------------------------------------------------------- decode with INT8 weights

def gemv_operands(M, K, N, group_size, dtype=torch.float32, seed=0):
    """x [M, K] in dtype, full-range int8 weights [N, K], scales [N, G], bias [N]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype)
    qweight = torch.randint(-127, 128, (N, K), generator=gen).to(torch.int8)
    scales = torch.rand(N, -(-K // group_size), generator=gen) * 0.02 + 1e-3
    return [t.to(DEV) for t in (x, qweight, scales, torch.randn(N, generator=gen))]


def int8_twin(x, qweight, scales, group_size, bias):
    """float64 product of the same operands, and the same sum over the terms' magnitudes (the bounds' scale)."""
    want = kernels.int8_gemv_torch(x, qweight, scales, group_size, bias)
    mag = kernels.int8_gemv_torch(x.abs(), qweight.abs(), scales.abs(), group_size,
                                  None if bias is None else bias.abs())
    return want, mag


def assert_gemv_close(y, x, qweight, scales, group_size, bias):
    """y (fp32) against float64 of the same operands, within int8_gemv's stated bound (BK = 128, P counted for
    the narrowest tiles, 16 channels)."""
    P = -(-x.shape[1] // 16)
    want, mag = int8_twin(x, qweight, scales, group_size, bias)
    err = (y.double() - want).abs()
    assert y.shape == want.shape and (err <= (128 + 2 * P + 2) * 2.0 ** -24 * mag).all(), err.max().item()


@needs_triton
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("splits,bias", [(None, True), (1, False), (3, True)])
def test_int8_gemv_matches_float64(M, splits, bias):
    """K = 200: a group of 128 and a partial one of 72 (masked); N = 48: a column tile past the edge; one run of K
    per program or several (their partial sums added afterwards)."""
    x, qweight, scales, b = gemv_operands(M, 200, 48, 128, seed=M)
    b = b if bias else None
    y = kernels.int8_gemv(x, qweight, scales, 128, b, splits=splits)
    assert y.dtype == torch.float32
    assert_gemv_close(y, x, qweight, scales, 128, b)


@needs_triton
@pytest.mark.parametrize("group_size,K", [(16, 200), (64, 200), (1000, 200), (128, 24)])
def test_int8_gemv_other_group_widths(group_size, K):
    """Tiles as wide as the group allows (16, 64), one group wider than K, and a layer of 24 channels (one group
    in one masked tile of 32); half-precision x gives its dtype back."""
    x, qweight, scales, b = gemv_operands(2, K, 40, min(group_size, K), seed=group_size)
    assert_gemv_close(kernels.int8_gemv(x, qweight, scales, group_size, b), x, qweight, scales, group_size, b)
    y16 = kernels.int8_gemv(x.half(), qweight, scales, group_size, b)
    want = kernels.int8_gemv_torch(x.half(), qweight, scales, group_size, b)
    assert y16.dtype == torch.float16 and rms_err(y16, want) < 1e-3


def w8aspike_twin(x, qweight, scales, group_size, k, bias):
    """The float64 twin on spike_quant's exact counts, the same over the terms' magnitudes, and the counts."""
    counts, vth = spike_quant_ref(x, k)
    want = kernels.spike_linear_torch(counts, vth, qweight, scales, group_size, bias, torch.float64)
    mag = kernels.spike_linear_torch(counts.abs(), vth, qweight.abs(), scales.abs(), group_size,
                                     None if bias is None else bias.abs(), torch.float64)
    return want, mag, counts


def assert_w8aspike_gemv_close(y, x, qweight, scales, group_size, k, bias):
    """y (fp32) against the float64 twin on spike_quant's exact counts, within w8aspike_gemv's bound: int8_gemv's for
    the hi and the lo row (|hi| 2^11 + |lo| = |counts|), times vth, plus the bias and the final sums."""
    want, mag, counts = w8aspike_twin(x, qweight, scales, group_size, k, bias)
    P = -(-x.shape[1] // 16)
    err = (y.double() - want).abs()
    assert y.shape == want.shape and (err <= (128 + 2 * P + 6) * 2.0 ** -24 * mag).all(), err.max().item()
    return counts


@needs_triton
@pytest.mark.parametrize("M,splits,bias", [(1, None, True), (3, 1, False), (8, 3, True)])
def test_w8aspike_gemv_matches_float64_twin(M, splits, bias):
    """W8ASpike's decode GEMV on exact spike counts: K = 200 (groups of 128 and 72), N = 48; heavy-tailed x with
    counts past 127 (no int8 clamp here) and, at k = 12, a row whose count passes 2^11 (the hi row at work)."""
    x, qweight, scales, b = gemv_operands(M, 200, 48, 128, seed=20 + M)
    x = x * torch.exp(torch.randn_like(x))
    x[-1, 3] = 1e4
    b = b if bias else None
    for k in (3.0, 12.0):
        y = kernels.w8aspike_gemv(x.view(M, 1, 200), qweight, scales, 128, k, b, splits=splits)
        assert y.shape == (M, 1, 48) and y.dtype == torch.float32
        counts = assert_w8aspike_gemv_close(y.view(M, 48), x, qweight, scales, 128, k, b)
        assert counts.abs().max() > (2048 if k == 12 else 127), counts.abs().max()


@needs_triton
def test_w8aspike_gemv_refuses_more_rows_than_its_tile():
    """Each row's counts enter the kernel as two rows, 16 its tile: 9 to 16 rows (which int8_gemv itself takes) are
    refused, not left half computed; so are counts that could reach 2^22 (K k), past tf32's exact integers."""
    x, qweight, scales, _ = gemv_operands(12, 200, 48, 128)
    with pytest.raises(ValueError, match="w8aspike_gemv multiplies at most 8 rows"):
        kernels.w8aspike_gemv(x, qweight, scales, 128, 3.0)
    with pytest.raises(ValueError, match=r"below 2\^22"):
        kernels.w8aspike_gemv(x[:2], qweight, scales, 128, 2.0 ** 22 / 200)
    kernels.w8aspike_gemv(x[:8], qweight, scales, 128, 3.0)


def test_int8_gemv_bad_inputs():
    x, qweight, scales, _ = gemv_operands(2, 200, 48, 128)
    with pytest.raises(ValueError, match="share K"):
        kernels.int8_gemv(x[:, :100], qweight, scales, 128)
    with pytest.raises(TypeError, match="int8"):
        kernels.int8_gemv(x, qweight.float(), scales, 128)
    with pytest.raises(ValueError, match="at most 16 rows"):
        kernels.int8_gemv(x.repeat(9, 1), qweight, scales, 128)
    with pytest.raises(ValueError, match="scales"):
        kernels.int8_gemv(x, qweight, scales[:, :1], 128)
    with pytest.raises(ValueError, match="whole K tiles"):
        kernels.int8_gemv(x, qweight, torch.ones(48, 9, device=DEV), 24)
    assert not kernels.int8_gemv_fits(200, 24) and kernels.int8_gemv_fits(24, 128)


@needs_triton
def test_int8_linear_through_the_kernel_equals_the_reference(monkeypatch):
    """W8ASpikeLinear with spike_k=None (weight-only INT8): decode-sized inputs through int8_gemv (forced, as on
    CUDA) equal its dequantized float path; more rows than INT8_GEMV_MAX_ROWS and gradients keep the float path."""
    from spiking import W8ASpikeLinear
    torch.manual_seed(0)
    m = W8ASpikeLinear.from_linear(torch.nn.Linear(200, 48), group_size=128, spike_k=None).to(DEV)
    calls = spy(monkeypatch, "int8_gemv")
    for shape in [(1, 1, 200), (3, 1, 200), (1, 8, 200)]:
        x = torch.randn(shape, device=DEV)
        monkeypatch.setattr(kernels, "INT8_GEMV_IMPL", "triton")
        with torch.no_grad():
            fast = m(x)
        assert calls and fast.shape == (*shape[:2], 48) and fast.dtype == x.dtype
        monkeypatch.setattr(kernels, "INT8_GEMV_IMPL", "torch")
        ref = m(x)
        assert rms_err(fast, ref) < 1e-6
        calls.clear()
    monkeypatch.setattr(kernels, "INT8_GEMV_IMPL", "triton")
    with torch.no_grad():
        m(torch.randn(1, 9, 200, device=DEV))
    m(torch.randn(1, 2, 200, device=DEV, requires_grad=True))
    assert not calls


@gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 4])
def test_gpu_int8_gemv_7b_shape(M):
    """A 7B MLP projection (K=3584, N=18944) from bf16 activations: the kernel (fp32 sums) within its bound of
    float64 on the same operands before the cast, and its bf16 output within bf16 rounding."""
    x, qweight, scales, b = gemv_operands(M, 3584, 18944, 128, torch.bfloat16)
    y = kernels._gemv8_op(x, qweight, scales, 128, None)
    assert_gemv_close(y, x, qweight, scales, 128, None)
    out = kernels.int8_gemv(x, qweight, scales, 128, b)
    assert out.dtype == torch.bfloat16 and rms_err(out, kernels.int8_gemv_torch(x, qweight, scales, 128, b)) < 4e-3


# ----------------------------------------------------------------------------- spike counts on FP8 tensor cores

HAS_FP8_MM = hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn")
needs_fp8 = pytest.mark.skipif(not HAS_FP8_MM or (CUDA and torch.cuda.get_device_capability() < (8, 9)),
                               reason="needs torch._scaled_mm with e4m3 (a CPU torch >= 2.5, or CUDA capability 8.9)")


def fp8_operands(M, K, N, seed, spread=0.0):
    """x [M, K] (spread > 0: heavy tails, x * exp(spread * randn), so many counts pass 16), the e4m3 weight [N, K]
    per output channel with its scale [N] (spiking.quantize_weight_fp8's scheme), bias [N]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * torch.exp(spread * torch.randn(M, K, generator=gen))
    w = torch.randn(N, K, generator=gen) / K ** 0.5
    s = w.abs().amax(1) / 448
    return x.to(DEV), (w / s[:, None]).to(torch.float8_e4m3fn).to(DEV), s.to(DEV), torch.randn(N, generator=gen).to(DEV)


def fp8_exact(x, w8, s, k, bias):
    """float64 product of the exact (unrounded) counts and the dequantized e4m3 weight, and the magnitudes' sum."""
    c, vth = spike_quant_ref(x, k)
    wd = w8.double() * s.double()[:, None]
    y = (c.double() @ wd.T) * vth.double() + bias.double()
    mag = (c.double().abs() @ wd.abs().T) * vth.double() + bias.double().abs()
    return c, vth, y, mag


def assert_fp8_close(y, want, mag, K):
    """spike_linear_fp8's stated bound for fp32 sums and float32 out: (K + 3) 2^-24 times the magnitudes."""
    err = (y.double() - want).abs()
    assert y.shape == want.shape and (err <= (K + 3) * 2.0 ** -24 * mag).all(), (err / mag).max().item()


@needs_fp8
@pytest.mark.parametrize("bias", [True, False])
def test_spike_linear_fp8_within_16_is_the_exact_product(monkeypatch, bias):
    """Counts within +-16 (uniform x: |count| <= k * max|x| / mean|x| ~ 6): e4m3 holds them exactly, so the twin is
    the float64 product of the exact counts, and torch._scaled_mm (forced on a CPU: float32 out) is within its
    accumulation bound of it."""
    if not CUDA:
        monkeypatch.setattr(kernels, "SPIKE_FP8_IMPL", "scaled_mm")
    _, w8, s, b = fp8_operands(37, 256, 48, seed=1)
    x = torch.rand(37, 256, generator=torch.Generator().manual_seed(2)).to(DEV) * 2 - 1
    b = b if bias else torch.zeros_like(b)
    c, _, want, mag = fp8_exact(x, w8, s, 3.0, b)
    assert c.abs().max() <= 16
    assert torch.equal(kernels.spike_linear_fp8_torch(x, w8, s, 3.0, b if bias else None), want)
    assert kernels.use_spike_fp8(x)
    y = kernels.spike_linear_fp8(x.float(), w8, s, 3.0, b if bias else None)
    if CUDA:   # bf16 out: the output's rounding dominates
        assert (y.double() - want).abs().max() <= 2.0 ** -8 * want.abs().max()
    else:
        assert y.dtype == torch.float32
        assert_fp8_close(y, want, mag, 256)


@needs_fp8
def test_spike_linear_fp8_rounds_counts_past_16(monkeypatch):
    """Heavy-tailed x: many counts past 16, which e4m3 rounds to 4 significant bits (17 -> 16, 100 -> 96). The fast
    path equals the twin (the same rounded counts) within its accumulation bound; the twin departs from the
    exact-count product by at most sum over the counts past 16 of |c w| / 16 (times vth and scale), and does
    depart. A row with a count past 448 (e4m3's largest) is the exact-count product (the float path)."""
    if not CUDA:
        monkeypatch.setattr(kernels, "SPIKE_FP8_IMPL", "scaled_mm")
    x, w8, s, b = fp8_operands(37, 256, 48, seed=3, spread=1.0)
    x[5, 7] = 1e4                                      # row 5: a count past 448
    c, vth, exact, mag = fp8_exact(x, w8, s, 3.0, b)
    assert (c.abs() > 16).float().mean() > 0.01 and c[5].abs().max() > 448
    assert c[torch.arange(37) != 5].abs().max() <= 448
    twin = kernels.spike_linear_fp8_torch(x, w8, s, 3.0, b)
    y = kernels.spike_linear_fp8(x, w8, s, 3.0, b)
    if CUDA:
        assert (y.double() - twin).abs().max() <= 2.0 ** -8 * twin.abs().max()
    else:
        assert_fp8_close(y, twin, mag * (1 + 1 / 16), 256)   # the rounded counts' magnitudes: at most 17/16 of c's
    big = torch.where(c.abs() > 16, c, torch.zeros_like(c)).double().abs()
    wd = (w8.double() * s.double()[:, None]).abs()
    bound = (big @ wd.T) * vth.double() / 16
    dev = (twin - exact).abs()
    assert (dev <= bound * (1 + 1e-9) + 1e-12).all() and dev.max() > 0
    assert torch.equal(twin[5], exact[5])


@needs_fp8
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=[gpu, needs_cuda])])
def test_spike_linear_fp8_compiles_in_one_graph(monkeypatch, backend):
    """No graph break (fullgraph): the spike quantization and torch._scaled_mm stay in the compiled block's graph
    (inductor fuses the quantization into the pass before it) and the host read of the wide rows happens inside
    the op _fp8_wide_rows, which still recomputes a row with a count past 448 exactly. Traced with aot_eager
    (functionalization of the op's in-place write included, no code generation); on a GPU also by inductor, whose
    fused quantization may round a count the other way at a half: equal to bf16's precision."""
    if not CUDA:
        monkeypatch.setattr(kernels, "SPIKE_FP8_IMPL", "scaled_mm")
    x, w8, s, b = fp8_operands(37, 256, 48, seed=3, spread=1.0)
    x[5, 7] = 1e4                                      # row 5: a count past 448
    x = x.to(DEV)

    def f(x):
        return kernels.spike_linear_fp8(torch.nn.functional.silu(x) * 2, w8, s, 3.0, b)
    want = f(x)
    twin = kernels.spike_linear_fp8_torch(torch.nn.functional.silu(x) * 2, w8, s, 3.0, b, want.dtype)
    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True, backend=backend)(x)
    if backend == "aot_eager":
        assert torch.equal(y, want) and torch.equal(y[5], twin[5])   # row 5: the twin's exact-count product
    else:
        assert (y.double() - want.double()).abs().max() <= 2.0 ** -7 * want.double().abs().max()


def test_spike_linear_fp8_bad_shapes_fall_back(monkeypatch):
    """K or N not a multiple of 16 (torch._scaled_mm's stride rules) or no rows: the twin in float64, cast to x's
    dtype; torch._scaled_mm is never called and nothing raises."""
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1), raising=False)
    for M, K, N in ((5, 40, 48), (5, 64, 40), (0, 64, 48)):
        x, w8, s, b = fp8_operands(M, K, N, seed=K + N)
        y = kernels.spike_linear_fp8(x.view(M, 1, K), w8, s, 3.0, b)
        assert y.shape == (M, 1, N) and y.dtype == x.dtype
        assert torch.equal(y.view(M, N), kernels.spike_linear_fp8_torch(x, w8, s, 3.0, b, x.dtype))
    assert not calls


def test_use_spike_fp8(monkeypatch):
    x = torch.randn(4, 32)
    assert not kernels.use_spike_fp8(x)                    # auto: CUDA tensors only
    monkeypatch.setattr(kernels, "SPIKE_FP8_IMPL", "scaled_mm")
    assert kernels.use_spike_fp8(x) == HAS_FP8_MM
    assert not kernels.use_spike_fp8(x.requires_grad_())   # inference only
    monkeypatch.setattr(kernels, "SPIKE_FP8_IMPL", "torch")
    assert not kernels.use_spike_fp8(torch.randn(4, 32, device=DEV))


# ----------------------------------------------------------------------------- decode with FP8 (e4m3) weights

def fp8_twin(x, w8, s, k, bias):
    """The float64 twin spike_linear_fp8_torch on the same operands, and the sum over its terms' magnitudes, those of
    the counts rounded as e4m3 (a row past 448 kept exact)."""
    want = kernels.spike_linear_fp8_torch(x, w8, s, k, bias)
    counts, vth = spike_quant_ref(x, k)
    wide = counts.abs().amax(-1, keepdim=True) > 448
    c = torch.where(wide, counts, counts.clamp(-448, 448).to(torch.float8_e4m3fn).float()).double()
    mag = (c.abs() @ (w8.double() * s.double()[:, None]).abs().T) * vth.double()
    return want, mag if bias is None else mag + bias.double().abs()


def assert_fp8_gemv_close(y, x, w8, s, k, bias):
    """y (fp32) against the float64 twin spike_linear_fp8_torch on the same operands, within fp8_gemv's stated bound
    (BK = 128, P counted for the narrowest tiles, 16 channels); the magnitudes are those of the rounded counts."""
    K = x.shape[1]
    P = -(-K // 16)
    want, mag = fp8_twin(x, w8, s, k, bias)
    err = (y.double() - want).abs()
    assert y.shape == want.shape and (err <= (128 + 2 * P + 4) * 2.0 ** -24 * mag).all(), (err / mag).max().item()
    return want


@needs_triton
@pytest.mark.parametrize("M,wide,splits", [(1, False, None), (1, True, 1), (3, True, 3), (8, True, None)])
@pytest.mark.parametrize("bias", [True, False])
def test_fp8_gemv_matches_float64_twin(M, wide, splits, bias):
    """K = 200 (a partial last tile, masked), N = 48 (a column tile past the edge); heavy-tailed x: counts past 16,
    which e4m3 rounds, and (wide) a row whose count passes 448, kept exact: the twin's rounded or exact counts."""
    x, w8, s, b = fp8_operands(M, 200, 48, seed=10 + M, spread=1.0)
    if wide:
        x[M - 1, 7] = 1e4
    b = b if bias else None
    y = kernels.fp8_gemv(x.view(M, 1, 200), w8.view(torch.uint8), s, 3.0, b, splits=splits)
    assert y.shape == (M, 1, 48) and y.dtype == torch.float32
    want = assert_fp8_gemv_close(y.view(M, 48), x, w8, s, 3.0, b)
    counts = spike_quant_ref(x, 3.0)[0]
    rest = counts[:M - wide]                 # rows rounded in e4m3: some counts past 16, none past 448
    assert (rest.abs() <= 448).all() and (M == wide or (rest.abs() > 16).any())
    if wide:   # the twin's exact counts on that row, rounded ones elsewhere
        assert counts[M - 1].abs().max() > 448
        exact = kernels.spike_linear_fp8_torch(x[M - 1:], w8, s, 3.0, b)
        assert torch.equal(want[M - 1:], exact)


@needs_triton
@pytest.mark.parametrize("fmt", [1, 2])
def test_fp8_gemv_decodes_every_e4m3_byte(fmt):
    """Every e4m3 bit pattern but the NaNs (0x7f, 0xff: quantize_weight_fp8 never makes them) through the kernel
    times the identity: torch's own float8_e4m3fn value, exactly (a zero's sign aside). fmt 1: Triton's conversion
    (GPUs of capability >= 8.9, the interpreter); fmt 2: _e4m3_to_f32's integer decoding (older GPUs)."""
    bits = torch.arange(256, dtype=torch.int32)
    bits = torch.where((bits == 0x7F) | (bits == 0xFF), 0, bits).to(torch.uint8).view(16, 16).to(DEV)
    out = torch.full((16, 16), float("nan"), device=DEV)
    eye = torch.eye(16, device=DEV)
    kernels._gemv8(eye, bits, torch.ones(16, 1, device=DEV), out, 16, 1, kernels.INT8_GEMV_SAFE, fmt, "ieee")
    assert torch.equal(out.T, bits.view(torch.float8_e4m3fn).float())


def eight_bit_layer(kind):
    """A W8ASpikeLinear (groups of 128) or FP8SpikeLinear at spike k 3 from a random nn.Linear(200, 48); the switch
    of its decode GEMV, the kernel's name, and a check of an output against the float64 twin within its bound."""
    import spiking
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 48)
    if kind == "w8aspike":
        m = spiking.W8ASpikeLinear.from_linear(lin, 128, spike_k=3.0).to(DEV)
        return m, "INT8_GEMV_IMPL", "w8aspike_gemv", lambda y, x: assert_w8aspike_gemv_close(
            y, x, m.qweight, m.scales, 128, 3.0, m.bias)
    m = spiking.FP8SpikeLinear.from_linear(lin, 3.0).to(DEV)
    return m, "FP8_GEMV_IMPL", "fp8_gemv", lambda y, x: assert_fp8_gemv_close(
        y, x, m.fp8_weight.view(torch.float8_e4m3fn), m.scales, 3.0, m.bias)


@needs_triton
@pytest.mark.parametrize("kind", ["w8aspike", "fp8"])
def test_8bit_linear_decode_through_the_gemv(kind, monkeypatch):
    """W8ASpikeLinear (spike k 3) and FP8SpikeLinear with their decode GEMV forced (as on CUDA): decode rows (1, 3, 8)
    through it, within its bound of the twin; more rows than INT8_GEMV_MAX_ROWS, gradients and the switch at "torch"
    keep the other paths, "auto" takes it on CUDA only. torch.compile(fullgraph=True) of a two-row decode forward
    with GEMV8_COMPILED "triton": one graph (no break: no host sync, the kernel one custom op with a fake) holding the
    op, and the eager output, also on a row whose count passes 448. (One row: test_one_row_takes_gemv_row.)"""
    m, switch, name, close = eight_bit_layer(kind)
    monkeypatch.setattr(kernels, switch, "triton")
    monkeypatch.setattr(kernels, "GEMV8_COMPILED", {"int8": "triton", "fp8": "triton"})   # "inductor": the next test
    step, graphs = fullgraph(m)
    for big in (False, True):
        x = torch.randn(1, 2, 200, device=DEV)
        if big:
            x[0, 1, 3] = 1e4
        with torch.no_grad():
            assert torch.equal(step(x), m(x))
    assert len(graphs) == 1 and "gemv8" in str(graphs[0].graph)
    torch._dynamo.reset()
    calls = spy(monkeypatch, name)   # after compiling: the compiled graph would guard on the list's length
    for shape in [(1, 1, 200), (3, 1, 200), (1, 8, 200)]:
        x = torch.randn(shape, device=DEV) * torch.exp(torch.randn(shape, device=DEV))
        with torch.no_grad():
            y = m(x)
        assert calls and y.shape == (*shape[:2], 48) and y.dtype == x.dtype
        close(y.view(-1, 48), x.view(-1, 200))
        calls.clear()
    with torch.no_grad():
        m(torch.randn(1, 9, 200, device=DEV))
    m(torch.randn(1, 2, 200, device=DEV, requires_grad=True))
    assert not calls
    monkeypatch.setattr(kernels, switch, "torch")
    with torch.no_grad():
        m(torch.randn(1, 1, 200, device=DEV))
    assert not calls
    monkeypatch.setattr(kernels, switch, "auto")
    x = torch.randn(2, 200, device=DEV)
    use = kernels.use_fp8_gemv(x, 3.0) if kind == "fp8" else kernels.use_w8aspike_gemv(x, 128, 3.0)
    assert use == (CUDA and torch.cuda.get_device_capability() >= (8, 0))


def row_twin(x, w, scales, group_size, fmt, vth, bias):
    """float64 of gemv_row's formula on the same operands, and the bound its docstring states (BK <= 512, P tiles
    counted for tiles of 16)."""
    wd = w.double() if fmt == kernels.W_FLOAT else (
        w.view(torch.float8_e4m3fn).double() if fmt != kernels.W_INT8 else w.double())
    if scales is not None:
        wd = wd * scales.double().repeat_interleave(min(group_size, w.shape[1]), 1)[:, :w.shape[1]]
    v = 1.0 if vth is None else vth.double()
    b = 0.0 if bias is None else bias.double()
    want = (x.double() @ wd.T) * v + b
    mag = (x.double().abs() @ wd.abs().T) * (v.abs() if vth is not None else 1.0) + (
        0.0 if bias is None else b.abs())
    return want, (512 + -(-x.shape[1] // 16) + 5) * 2.0 ** -24 * mag


ROW_SETTINGS = [None, dict(BN=4, BK=64, num_warps=2, num_stages=1, MAGIC=False),
                dict(BN=16, BK=256, num_warps=4, num_stages=3, ACC2D=False),
                dict(BN=8, BK=64, num_warps=4, num_stages=2, SPLIT=4)]


@needs_triton
@pytest.mark.parametrize("cfg", ROW_SETTINGS)
def test_gemv_row_matches_float64(cfg, monkeypatch):
    """gemv_row under the safe setting and three others (narrow tiles, int8 by the conversion instruction; wide tiles
    reduced per tile; K split in 4 parts, the last past K for K = 384: tiles of 64 in parts of 128), every weight
    format: int8 in groups of 128 (K = 384) with vth and a bias; e4m3 through Triton's conversion and through the
    integer decoding (K = 300: a masked last tile; one scale a row); bf16 weights, no scales. One row and three (each
    row its own program): within the stated bound of float64; a bf16 output is the fp32 one rounded."""
    if cfg is not None:
        monkeypatch.setattr(kernels, "GEMV_ROW_SAFE", cfg)
    kernels.row_tickets(torch.device(DEV))   # a CUDA launch splits only where they were made before
    gen = torch.Generator().manual_seed(7)
    for M in (1, 3):
        x = torch.randn(M, 384, generator=gen).to(DEV)
        q, sc, b = gemv_operands(M, 384, 40, 128, seed=M)[1:]
        v = (torch.rand(M, 1, generator=gen) + 0.5).to(DEV)
        bits, s8 = spiking.quantize_weight_fp8(torch.randn(24, 300, generator=gen))
        x3 = torch.randn(M, 300, generator=gen).to(DEV)
        wf = torch.randn(33, 200, generator=gen).bfloat16().to(DEV)
        xf = torch.randn(M, 200, generator=gen).bfloat16().to(DEV)
        cases = [(x, q, sc, 128, kernels.W_INT8, v, b), (x, q, sc, 128, kernels.W_INT8, None, None),
                 (x3, bits.view(torch.uint8).to(DEV), s8.view(24, 1).to(DEV), 300, kernels.W_E4M3, v, None),
                 (x3, bits.view(torch.uint8).to(DEV), s8.view(24, 1).to(DEV), 300, kernels.W_E4M3_BITS, None, None),
                 (xf, wf, None, 200, kernels.W_FLOAT, None, b[:33])]
        for args in cases:
            want, bound = row_twin(*args)
            y = kernels.gemv_row(*args, torch.float32)
            assert y.shape == want.shape and ((y.double() - want).abs() <= bound).all(), args[4]
            assert torch.equal(kernels.gemv_row(*args, torch.bfloat16), y.bfloat16())   # the cast last
    if cfg and cfg.get("SPLIT"):   # each launch leaves the tickets as it found them
        assert not kernels.row_tickets(torch.device(DEV)).any()


DOT_SETTINGS = [dict(BN=16, BK=64, num_warps=4, num_stages=2, DOT=True),
                dict(BN=32, BK=128, num_warps=4, num_stages=3, DOT=True, ACC2D=False, SPLIT=2)]


@needs_triton
@pytest.mark.parametrize("cfg", DOT_SETTINGS)
def test_gemv_row_counts_on_the_tensor_cores(cfg, monkeypatch):
    """gemv_row's DOT route (spike counts times 8-bit weights by tl.dot): W8ASpike's int8 groups of 128 (K = 384)
    with a bias and FP8's e4m3 rows (K = 300: a masked last tile), on gemv_counts_torch's counts of rows drawn as a
    layer's input, alone and as gemv_rows of three weights: within gemv_row's bound of float64 (int8 and the
    interpreter: sums in fp32; e4m3 on a GPU: the tensor cores' fewer bits, within 2^-9 of the products' magnitude,
    below the bf16 output's rounding). Rows the 8-bit type does not hold take the CUDA-core loop and stay within the
    bound: a count past 127 and a half for int8; a count of 17 (5 significant bits) and one past 448 for e4m3. The
    second setting splits K in two."""
    monkeypatch.setattr(kernels, "GEMV_ROW_SAFE", cfg)
    monkeypatch.setattr(kernels, "GEMV_ROW_CONFIGS", {})
    kernels.row_tickets(torch.device(DEV))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 384, generator=gen)
    x[2, 7] = 60.0                                           # a count past 127 (and past 16 for e4m3)
    q, sc, b = gemv_operands(1, 384, 40, 128, seed=4)[1:]
    c1, v1 = (t.to(DEV) for t in kernels.gemv_counts_torch(x, 3.0))
    c1[1, 3] += 0.5                                          # a value no integer holds
    bits, s8 = spiking.quantize_weight_fp8(torch.randn(56, 300, generator=gen))
    w8, s8 = bits.view(torch.uint8).to(DEV), s8.view(56, 1).to(DEV)
    x3 = torch.randn(3, 300, generator=gen)
    x3[2, 5] = 300.0                                         # a count past 448: the row keeps exact counts
    c3, v3 = (t.to(DEV) for t in kernels.gemv_counts_torch(x3, 3.0, fp8=True))
    c3[1, 9] = 17.0                                          # not an e4m3 value
    assert c1[2].abs().max() > 127 and c3[2].abs().max() > 448
    for c, w, s, gs, fmt, v, bias in ((c1, q, sc, 128, kernels.W_INT8, v1, b), (c3, w8, s8, 300, kernels.W_E4M3, v3,
                                                                                   None)):
        for m in range(3):   # one row a call, as a decode step's (row 0: on the tensor cores)
            want, bound = row_twin(c[m:m + 1], w, s, gs, fmt, v[m:m + 1], bias)
            if CUDA and fmt == kernels.W_E4M3 and m == 0:
                wd = w.view(torch.float8_e4m3fn).double() * s.double()
                bound = bound + 2.0 ** -9 * (c[m:m + 1].double().abs() @ wd.abs().T) * v[m:m + 1].double()
            y = kernels.gemv_row(c[m:m + 1], w, s, gs, fmt, v[m:m + 1], bias, torch.float32)
            assert ((y.double() - want).abs() <= bound).all(), (fmt, m)
            ws = [w[:8], w, w[8:24]]
            ys = kernels.gemv_rows(c[m:m + 1], ws, [s[:8], s, s[8:24]], gs, fmt, v[m:m + 1],
                                   [None if bias is None else bias[:8], bias, None if bias is None else bias[8:24]],
                                   torch.float32)
            assert torch.equal(ys[1], y) and torch.equal(ys[0], y[:, :8]) and torch.equal(ys[2], y[:, 8:24])


@needs_triton
@pytest.mark.parametrize("n", [2, 3, 4])
def test_gemv_rows_matches_float64_and_gemv_row(n):
    """gemv_rows (one launch for 2-4 weights of one input): each output within gemv_row's bound of float64 and equal
    to gemv_row's on the same weight, for int8 groups with vth and biases (one row and three) and e4m3 weights of
    different heights without biases; mismatched weights are refused with the reason."""
    gen = torch.Generator().manual_seed(11)
    for M in (1, 3):
        x = torch.randn(M, 384, generator=gen).to(DEV)
        v = (torch.rand(M, 1, generator=gen) + 0.5).to(DEV)
        ops = [gemv_operands(M, 384, N, 128, seed=10 * M + N)[1:] for N in (40, 24, 8, 56)[:n]]
        fp8 = [spiking.quantize_weight_fp8(torch.randn(N, 300, generator=gen)) for N in (24, 72, 16, 8)[:n]]
        x3 = torch.randn(M, 300, generator=gen).to(DEV)
        cases = [(x, [q for q, _, _ in ops], [sc for _, sc, _ in ops], 128, kernels.W_INT8, v, [b for *_, b in ops]),
                 (x3, [w.view(torch.uint8).to(DEV) for w, _ in fp8], [s.view(-1, 1).to(DEV) for _, s in fp8], 300,
                  kernels.W_E4M3, None, [None] * n)]
        for x_, ws, scs, gs, fmt, vth, bs in cases:
            ys = kernels.gemv_rows(x_, ws, scs, gs, fmt, vth, bs, torch.float32)
            assert len(ys) == n
            for y, w, sc, b in zip(ys, ws, scs, bs):
                want, bound = row_twin(x_, w, sc, gs, fmt, vth, b)
                assert ((y.double() - want).abs() <= bound).all(), fmt
                assert torch.equal(y, kernels.gemv_row(x_, w, sc, gs, fmt, vth, b, torch.float32))
    q, sc, b = gemv_operands(1, 384, 40, 128, seed=1)[1:]
    y0, y = kernels.gemv_rows(x[:1], [q[:0], q], [sc[:0], sc], 128, kernels.W_INT8, None, [b[:0], b], torch.float32)
    assert y0.shape == (1, 0) and torch.equal(y, kernels.gemv_row(x[:1], q, sc, 128, kernels.W_INT8, None, b,
                                                                   torch.float32))   # a weight of no rows beside
    with pytest.raises(ValueError, match="share x's K"):
        kernels.gemv_rows(x[:1], [q, q[:, :256]], [sc, sc[:, :2]], 128, kernels.W_INT8, None, [b, b], torch.float32)
    with pytest.raises(ValueError, match="a bias or none"):
        kernels.gemv_rows(x[:1], [q, q], [sc, sc], 128, kernels.W_INT8, None, [b, None], torch.float32)


@needs_triton
def test_gemv_row_makes_the_spike_counts_as_spike_quant():
    """gemv_row with spike_k (x a layer's input): the counts and vth made in the kernel are spike_quant_torch's, so
    its output equals gemv_row's on those counts and vth, bit for bit, and lies within the float64 bound. x holds
    eighths, so that mean|x| is exact in any summation order; row 0 at k = 4 mean|x| has vth = 1/4 exactly, and
    its odd eighths are ties (x / vth = n + 1/2: to even); row 1 holds a count past 448 (e4m3: its counts stay exact);
    the e4m3 formats round counts past 16 to 4 significant bits (ties to even). int8 groups with a bias (K = 384),
    e4m3 by Triton's conversion and by integer decoding (K = 300: a masked last tile), bf16 and fp32 inputs; and
    gemv_rows the same per weight."""
    gen = torch.Generator().manual_seed(5)
    for K, fmt, dt in [(384, kernels.W_INT8, torch.float32), (300, kernels.W_E4M3, torch.bfloat16),
                       (300, kernels.W_E4M3_BITS, torch.float32)]:
        m = torch.randint(-60, 61, (3, K), generator=gen).float()
        m[1, 7] = 4000.0                                         # x = 500: a count of about 2000 in row 1
        x = (m / 8).to(dt)
        k = float(4 * x[0].float().abs().mean())                 # row 0: vth = mean / (4 mean) = 1/4
        counts, vth = kernels.spike_quant_torch(x, k)
        assert vth[0].item() == 0.25 and (counts[0] % 2 != 0).any()
        if fmt == kernels.W_INT8:
            q, sc, b = gemv_operands(3, K, 40, 128, seed=3)[1:]
            ws, scs, bs, gs = [q, q[:24]], [sc, sc[:24]], [b, b[:24]], 128
        else:
            fp8 = [spiking.quantize_weight_fp8(torch.randn(N, K, generator=gen)) for N in (24, 40)]
            ws, scs, bs, gs = [w.view(torch.uint8).to(DEV) for w, _ in fp8], [s.view(-1, 1).to(DEV) for _, s in fp8], \
                [None, None], K
            counts = kernels.e4m3_counts(counts)
            assert ((counts != kernels.spike_quant_torch(x, k)[0]) & (counts.abs() > 16)).any()   # rounded
            assert counts[1].abs().max() > 448                   # row 1 kept exact
        x, c, v = x.to(DEV), counts.to(DEV), vth.to(DEV)
        ys = kernels.gemv_rows(x, ws, scs, gs, fmt, None, bs, torch.float32, k)
        for w, sc, b, y2 in zip(ws, scs, bs, ys):
            y = kernels.gemv_row(x, w, sc, gs, fmt, None, b, torch.float32, k)
            assert torch.equal(y, kernels.gemv_row(c, w, sc, gs, fmt, v, b, torch.float32)), fmt
            assert torch.equal(y2, y)
            want, bound = row_twin(c, w, sc, gs, fmt, v, b)
            assert ((y.double() - want).abs() <= bound).all()
    with pytest.raises(ValueError, match="vth None"):
        kernels.gemv_row(x, ws[0], scs[0], gs, fmt, v, None, torch.float32, k)


@needs_triton
def test_spike_counts_equal_gemv_counts_torch(monkeypatch):
    """spike_counts (one program a row) against its twin gemv_counts_torch, bit for bit: rows of eighths (mean|x|
    exact in any order) where row 0 has vth = 1/4 exactly and ties at n + 1/2 (to even), row 1 a count past 448
    (FP8: kept exact), row 2 all zeros (vth clamped to 1e-5); int8 counts (exact) and FP8 counts (e4m3-rounded),
    fp32 and bf16 inputs, a row within one block and one looped over four (ROW_COUNTS_BLOCK cut to 128). FP8's
    and W8ASpike's one-row GEMVs give the same output with kernels.ROW_COUNTS on and off."""
    gen = torch.Generator().manual_seed(9)
    for K, block, dt in ((300, 32768, torch.float32), (500, 128, torch.bfloat16)):
        monkeypatch.setattr(kernels, "ROW_COUNTS_BLOCK", block)
        m = torch.randint(-60, 61, (3, K), generator=gen).float()
        m[1, 7], m[2] = 4000.0, 0.0
        x = (m / 8).to(dt)
        k = float(4 * x[0].float().abs().mean())
        for fp8 in (False, True):
            c, v = kernels.spike_counts(x.to(DEV), k, fp8)
            c0, v0 = kernels.gemv_counts_torch(x, k, fp8)
            assert v0[0].item() == 0.25 and v0[2].item() == torch.tensor(1e-5).item() and c0[1].abs().max() > 448
            assert torch.equal(v.cpu(), v0) and torch.equal(c.cpu(), c0), (K, fp8)
    with pytest.raises(ValueError, match="k > 0"):
        kernels.spike_counts(x.to(DEV), 0.0)
    bits, s8 = spiking.quantize_weight_fp8(torch.randn(24, 500, generator=gen))
    q, sc = spiking.quantize_weight(torch.randn(24, 500, generator=gen), 500)
    for routed in (lambda: kernels.fp8_gemv(x[:1].to(DEV), bits.to(DEV), s8.to(DEV), k),
                   lambda: kernels.w8aspike_gemv(x[:1].to(DEV), q.to(DEV), sc.to(DEV), 500, k)):
        monkeypatch.setattr(kernels, "ROW_COUNTS", False)
        y = routed()
        monkeypatch.setattr(kernels, "ROW_COUNTS", True)   # the one-row GEMV's counts from spike_counts instead
        assert torch.equal(routed(), y)


def spiking_decode_logits(device, quant="fp8"):
    """A spiking model of one GLA and one SWA layer, its weights as `bench.py decode --quant quant` makes them (its
    tiny twin), and logits(step): its logits over three decode steps of step (model.forward, or it compiled) after a
    20-token prefill, the same tokens fed whatever the logits."""
    import bench
    from generate import prefill
    from model import GPT

    torch.manual_seed(0)
    m = bench.quantize(GPT(bench.first_layers("tiny", 2)).to(device).eval(), quant)
    ids = torch.randint(0, 512, (1, 23), generator=torch.Generator().manual_seed(0)).to(device)

    def logits(step, before_steps=lambda: None):
        cache, out = m.new_cache(1, 64), []
        with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):   # a cached graph skips passes
            prefill(m, cache, ids[:, :20], 16)
            before_steps()
            for i in range(20, 23):
                torch.compiler.cudagraph_mark_step_begin()
                pos = torch.full((1, 1), cache.seen, device=device)
                out.append(step(ids[:, i:i + 1], cache=cache, input_pos=pos, last_only=True)[0][:, -1].clone())
                cache.seen += 1
        return torch.stack(out)
    return m, logits


def count_rounds(monkeypatch):
    """A list that gets (round ops before, after) of each graph decode_cse's fx_graph_cse merges: spike-count passes."""
    from torch._functorch import compile_utils

    real, rounds = compile_utils.fx_graph_cse, []

    def counted(graph):
        new = real(graph)
        rounds.append(tuple(sum(1 for x in g.nodes if x.op == "call_function" and "round" in str(x.target))
                            for g in (graph, new)))
        return new
    monkeypatch.setattr(compile_utils, "fx_graph_cse", counted)
    return rounds


@gpu
@needs_cuda
def test_decode_cse_makes_each_input_spike_counts_once(monkeypatch):
    """compile_decode (kernels.decode_cse in the compiled step, its default) on CUDA: a spiking FP8 step of one GLA
    and one SWA layer makes spike counts once per distinct projection input (GLA: the block input for q, k, v and
    the gate's first factor, the gate's rank-r hidden, o's input, the MLP input for gate and up, down's input; SWA:
    the same without the gate's two), 9 count passes instead of one per projection (16), and its logits equal the
    eager model's within a few counts' change, as compiled and eager norms may round a count differently (the
    counts made before the one-row kernel: GEMV_ROW_SPIKES off, its default). On a CPU:
    test_grouped_row_products_in_a_compiled_fp8_step."""
    monkeypatch.setattr(kernels, "GEMV_ROW_SPIKES", False)
    rounds = count_rounds(monkeypatch)
    m, logits = spiking_decode_logits("cuda")
    ref = logits(m.forward)
    torch._dynamo.reset()
    step = kernels.compile_decode(m.forward, torch.device("cuda"))
    torch.testing.assert_close(logits(step), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert rounds and all(after * 16 == before * 9 for before, after in rounds), rounds


@gpu
@needs_cuda
@pytest.mark.parametrize("quant", ["fp8", "w8aspike"])
def test_gpu_split_rows_in_a_compiled_decode_step(quant, monkeypatch):
    """compile_decode on CUDA with the tall shapes' SPLIT settings (K split among the programs of a block, the last
    adding the parts: row_tickets made before the CUDA graphs): a spiking step of one GLA and one SWA layer takes split
    launches, and its logits over three steps, replayed from the graphs, equal the eager model's, whose launches
    (no tickets made yet) run whole, within a few counts' change (compiled and eager norms may round a count
    differently)."""
    monkeypatch.setattr(kernels.row_tickets, "held", {})
    monkeypatch.setattr(kernels, "GEMV_ROW_CONFIGS", {torch.cuda.get_device_capability(): {
        (kind, "tall"): dict(BN=16, BK=16, num_warps=4, num_stages=3, ACC2D=False, SPLIT=4)   # 4 parts of K=64
        for kind in ("e4m3", "w8aspike")}})
    launches, launch = [], kernels._gemv_row

    def counted(x, ws, sts, vth, biases, outs, group_size, fmt, cfg, spike_k=0.0):   # the parts each launch takes
        launches.append(cfg.get("SPLIT", 1) if kernels.row_tickets(x.device, make=False) is not None else 1)
        return launch(x, ws, sts, vth, biases, outs, group_size, fmt, cfg, spike_k)
    monkeypatch.setattr(kernels, "_gemv_row", counted)
    m, logits = spiking_decode_logits("cuda", quant)
    ref = logits(m.forward)
    assert set(launches) <= {1}
    torch._dynamo.reset()
    launches.clear()
    step = kernels.compile_decode(m.forward, torch.device("cuda"))
    torch.testing.assert_close(logits(step), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert 4 in launches, launches
    assert not kernels.row_tickets(torch.device("cuda")).any()        # every split launch left its tickets zero


@gpu
@needs_cuda
def test_gpu_row_reductions_persistent_in_a_compiled_decode_step(monkeypatch):
    """compile_decode's ROW_PERSISTENT rule (bench.py decode --row_persistent): the RMSNorm and spike counts of one
    3584-wide row (a 7B block's input) compile to persistent reductions (the row read once), where inductor's own
    rule (ROW_PERSISTENT = 0, the default) loops over it; the counts and vth equal the eager ones (spike_quant_torch
    on the eager norm), within a count's change where the two norms round differently."""
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(1, 3584, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(0))
    w = torch.rand(3584, device="cuda") + 0.5

    def norm_counts(x, w):
        x = x.float()
        return kernels.spike_quant_torch(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, 3.0)
    counts, vth = norm_counts(x, w)
    for width, kind in ((32768, "triton_per_"), (0, "triton_red_")):
        monkeypatch.setattr(kernels, "ROW_PERSISTENT", width)
        torch._dynamo.reset()
        step = kernels.compile_decode(norm_counts, torch.device("cuda"), options={"fx_graph_cache": False})
        (c, v), code = run_and_get_code(step, x, w)
        kernels_made = re.findall(r"def (triton_\w+)\(", "\n".join(code))
        reductions = [k for k in kernels_made if k.startswith(("triton_per_", "triton_red_"))]
        assert reductions and all(k.startswith(kind) for k in reductions), (width, kernels_made)
        torch.testing.assert_close(v, vth, rtol=1e-5, atol=0)
        assert (c - counts).abs().max() <= 1 and (c != counts).sum() <= 2


def test_decode_cse_in_compiled_blocks_merges_a_prefill_counts(monkeypatch):
    """bench.py ttft --cse (compile_blocks with kernels.decode_cse): a compiled spiking FP8 prefill of one GLA and
    one SWA block makes each input's spike counts once (9 count passes instead of 16) and its last logits equal the
    eager model's."""
    from generate import prefill

    rounds = count_rounds(monkeypatch)
    m, _ = spiking_decode_logits("cpu")
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))   # one chunk: one shape
    with torch.no_grad():
        ref = prefill(m, m.new_cache(1, 64), ids, 16)
        torch._dynamo.reset()
        kernels.compile_blocks(m, {"post_grad_custom_pre_pass": kernels.decode_cse()})
        with torch._inductor.config.patch(force_disable_caches=True):
            y = prefill(m, m.new_cache(1, 64), ids, 16)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    before, after = (sum(r[i] for r in rounds) for i in (0, 1))
    n = before // 16   # the graphs compiled (a recompile repeats them)
    assert n >= 1 and (before, after) == (16 * n, 9 * n), rounds


@needs_triton
def test_grouped_row_products_in_a_compiled_fp8_step(monkeypatch):
    """compile_decode's default pass, decode_cse(group=True), in a compiled spiking FP8 decode step of one GLA and
    one SWA layer on the one-row kernel: each input's spike counts made once (9 count passes where there were 16:
    GLA: the block input for q, k, v and the gate's first factor, the gate's rank-r hidden, o's input, the MLP input
    for gate and up, down's input; SWA: the same without the gate's two), q, k and v (same input, biases) and gate
    and up (same input) one gemv_rows launch each, 10 launches a step where there were 16 (the GLA gate's factors, o
    and down stay alone), and the logits equal the eager model's, whose one-row kernels make the counts themselves
    (GEMV_ROW_SPIKES on, spike_k: as spike_quant's). A graph of neither (a float step's) is left as it is (no
    fx_graph_cse)."""
    monkeypatch.setattr(kernels, "FP8_GEMV_IMPL", "triton")
    rounds = count_rounds(monkeypatch)
    made, launches = [], []
    group, launch = kernels.group_row_products, kernels._gemv_row
    monkeypatch.setattr(kernels, "group_row_products", lambda g: made.append(group(g)))
    monkeypatch.setattr(kernels, "_gemv_row", lambda x, ws, *a: launches.append((len(ws), a[7])) or launch(x, ws, *a))
    m, logits = spiking_decode_logits(DEV)
    with monkeypatch.context() as mp:
        mp.setattr(kernels, "GEMV_ROW_SPIKES", True)
        ref = logits(m.forward, launches.clear)
    assert launches == [(1, 3.0)] * 16 * 3                     # one weight each, the counts made in the kernel
    torch._dynamo.reset()
    y = logits(kernels.compile_decode(m.forward, torch.device(DEV)), launches.clear)
    tol = 1e-5 if DEV == "cpu" else 2e-2   # CUDA: compiled and eager norms may round a count differently
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert made and set(made) == {4}, made
    assert rounds and all(after * 16 == before * 9 for before, after in rounds), rounds
    if DEV == "cpu":   # (CUDA graphs replay the launches without Python) a step: 6 alone, 2 groups of 3 and of 2
        assert sorted(launches) == sorted([(n, 0.0) for n in [1] * 6 + [3, 3, 2, 2]] * 3), launches
    rounds.clear()
    graph = torch.fx.symbolic_trace(lambda x: torch.rsqrt(x.pow(2).mean(-1)) * x).graph   # no counts, no GEMVs
    kernels.decode_cse(group=True)(graph)
    assert rounds == []


def test_realize_gemv_inputs_writes_a_transcendental_projection_input_once():
    """decode_cse's realize_gemv_inputs on a post-grad-like graph: the input of a one-row GEMV in inductor's
    decomposed form (sum(x.unsqueeze(2) * w.T.unsqueeze(0), 1), as under coordinate-descent tuning on CUDA) and of an
    aten.mm goes through prims.inductor_force_stride_order where it is made with an exponential (SwiGLU's
    silu(g) * u; silu of a GEMV's output), with norms an RMSNorm's output too, not where it is not (a GEMV's output
    as it is; without norms the RMSNorm's rsqrt) or where the other operand is no graph input (a product of two
    activations; experts' weights gathered per row, as expert_rows in an MoE's decode step) or its stride is
    symbolic; the graph's values are unchanged, and inductor compiles the pass's graph to the same values as
    eager."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(g, u, w, w2, we, flat):
        h = F.silu(g) * u                                            # [1, K]: realized (decomposed GEMV's input)
        y = (h.unsqueeze(2) * w.t().unsqueeze(0)).sum(1)             # [1, N]
        n = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)  # a norm: realized only with norms
        a = torch.exp(y)                                             # an activation times an activation: no weight
        e = torch.sigmoid(y).expand(2, 16)                           # 2 rows through their experts: left
        return (torch.mm(F.silu(y), w2.t()), torch.mm(n, w2.t()), (a.unsqueeze(2) * y.unsqueeze(0)).sum(1),
                (e[:, None, :] * we[flat]).sum(-1))
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=gen) for s in ((1, 32), (1, 32), (16, 32), (8, 16), (4, 8, 16))]
    args.append(torch.tensor([3, 1]))
    from torch._inductor.inductor_prims import force_stride_order as force
    ref = f(*args)

    def name(b):   # which of f's tensors a realized node is, by the op that makes it or its inputs
        ins = {str(a.target) for a in b.all_input_nodes}
        return ("silu(y)" if str(b.target) == "aten.silu.default" else "norm(y)" if "aten.rsqrt.default" in ins
                else "silu(g) * u" if "aten.silu.default" in ins else b.format_node())
    for norms, want_kept in ((False, {"silu(g) * u": [32, 1], "silu(y)": [16, 1]}),
                             (True, {"silu(g) * u": [32, 1], "silu(y)": [16, 1], "norm(y)": [16, 1]})):
        gm = make_fx(f)(*args)
        assert kernels.realize_gemv_inputs(gm.graph, norms) == len(want_kept)
        gm.recompile()
        kept = {n.args[0]: n.args[1] for n in gm.graph.nodes if n.target is force}
        assert {name(b): st for b, st in kept.items()} == want_kept, gm.code
        for got, want in zip(gm(*args), ref):
            assert torch.equal(got, want)
    torch._dynamo.reset()
    step = torch.compile(f, options={"post_grad_custom_pre_pass": kernels.decode_cse(norms=True),
                                     "fx_graph_cache": False})
    for got, want in zip(step(*args), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a symbolic stride (K traced as a size variable) is left as it is: force_stride_order would need its size node
    sym = make_fx(lambda g, u, w: torch.mm(F.silu(g) * u, w.t()), tracing_mode="symbolic")(*args[:3])
    assert kernels.realize_gemv_inputs(sym.graph) == 0


@gpu
@needs_cuda
@pytest.mark.parametrize("norms", [False, True])
def test_gpu_realized_swiglu_input_in_a_compiled_float_decode_step(norms, monkeypatch):
    """compile_decode on CUDA (coordinate-descent tuning: inductor writes each one-row matmul as its own reduction) of
    a float model of one GLA and one SWA layer: realize_gemv_inputs finds each MLP's silu(gate) * up in the
    decomposed down_proj (one per layer), with norms also each RMSNorm output a projection reads (the two blocks'
    input and MLP norms, the GLA output's g_norm, the final norm before the head: 6 more), nothing else, and the
    logits over three steps equal the eager model's."""
    made, real = [], kernels.realize_gemv_inputs
    monkeypatch.setattr(kernels, "realize_gemv_inputs", lambda g, n=False: made.append(real(g, n)) or made[-1])
    monkeypatch.setattr(kernels, "REALIZE_GEMV_NORMS", norms)
    m, logits = spiking_decode_logits("cuda", "bf16")
    assert m.config.layout[:2] == ["gla", "swa"]
    m.config.spike_k = None
    for mod in m.modules():
        if hasattr(mod, "spike_k"):
            mod.spike_k = None
    ref = logits(m.forward)
    torch._dynamo.reset()
    step = kernels.compile_decode(m.forward, torch.device("cuda"))
    torch.testing.assert_close(logits(step), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert made and set(made) == {8 if norms else 2}, made


@needs_triton
def test_row_kernel_decodes_every_byte_exactly():
    """The integer decoding of e4m3 (W_E4M3_BITS) and Triton's conversion (W_E4M3) give every finite byte's value,
    and both int8 conversions every int8 value: a one-hot row picks each weight column out exactly."""
    bits = torch.arange(256, dtype=torch.uint8)
    bits = bits[(bits & 0x7F) != 0x7F].to(DEV)                  # the NaNs 0x7f, 0xff never occur
    w = bits.view(-1, 1).expand(-1, 16).contiguous()            # [254, 16]: row n all byte n
    x = torch.zeros(1, 16, device=DEV)
    x[0, 0] = 1.0
    for fmt in (kernels.W_E4M3, kernels.W_E4M3_BITS):
        y = kernels.gemv_row(x, w, torch.ones(w.shape[0], 1, device=DEV), 16, fmt, None, None, torch.float32)
        assert torch.equal(y[0], bits.view(torch.float8_e4m3fn).float()), fmt
    q = torch.arange(-128, 128, dtype=torch.int8, device=DEV).view(-1, 1).expand(-1, 16).contiguous()
    for magic in (True, False):   # every int8 value, by the bits of 2^23 + (q + 128) and by the conversion
        ones, out = torch.ones(256, 1, device=DEV), torch.empty(1, 256, device=DEV)
        y, = kernels._gemv_row(x, [q], [ones], None, [None], [out], 16, kernels.W_INT8,
                               dict(kernels.GEMV_ROW_SAFE, MAGIC=magic))
        assert torch.equal(y[0], q[:, 0].float()), magic


@needs_triton
@pytest.mark.parametrize("kind", ["int8", "w8aspike", "fp8"])
def test_one_row_takes_gemv_row(kind, monkeypatch):
    """A decode step of one row through int8_gemv, w8aspike_gemv or fp8_gemv (K = 256: whole groups of 128) is one
    gemv_row launch (no gemv8 op, no partial sums), within the bound of its float64 twin; compiled with
    fullgraph=True it is one graph holding gemv_row and no gemv8 op, equal to eager; two rows, or
    GEMV_ROW_MAX_ROWS = 0, take the gemv8 op instead."""
    x, q, sc, b = gemv_operands(1, 256, 48, 128, seed=11)
    x = x * torch.exp(torch.randn_like(x))
    bits, s8 = spiking.quantize_weight_fp8(torch.randn(48, 256))
    bits, s8 = bits.view(torch.uint8).to(DEV), s8.to(DEV)
    f, close = {
        "int8": (lambda x: kernels.int8_gemv(x, q, sc, 128, b),
                 lambda y, x: assert_gemv_close(y, x, q, sc, 128, b)),
        "w8aspike": (lambda x: kernels.w8aspike_gemv(x, q, sc, 128, 3.0, b),
                     lambda y, x: assert_w8aspike_gemv_close(y, x, q, sc, 128, 3.0, b)),
        "fp8": (lambda x: kernels.fp8_gemv(x, bits, s8, 3.0, b),
                lambda y, x: assert_fp8_gemv_close(y, x, bits.view(torch.float8_e4m3fn), s8, 3.0, b))}[kind]
    rows, ops = spy(monkeypatch, "gemv_row"), spy(monkeypatch, "_gemv8_op")
    with torch.no_grad():
        y = f(x)
    assert len(rows) == 1 and not ops
    close(y, x)
    step, graphs = fullgraph(f)
    with torch.no_grad():
        assert torch.equal(step(x), y)
    g = str(graphs[0].graph)
    assert len(graphs) == 1 and "gemv_row" in g and "gemv8" not in g
    torch._dynamo.reset()
    rows.clear()
    with torch.no_grad():
        f(torch.cat([x, x]))
        monkeypatch.setattr(kernels, "GEMV_ROW_MAX_ROWS", 0)
        f(x)
    assert not rows and len(ops) == 2


@gpu
@needs_cuda
@pytest.mark.parametrize("split", [None, 4])
@pytest.mark.parametrize("K,N", [(3584, 18944), (18944, 3584), (3584, 512)])
def test_gpu_gemv_row_7b_shapes(K, N, split, monkeypatch):
    """gemv_row under this GPU's setting (and one splitting K in 4 parts for every format, the parts added by the
    last program of each block) at the 7B's projection shapes, every weight format (int8 groups of 128 on spike
    counts with vth, e4m3 both decodings, bf16 weights on a bf16 row): within the stated bound of float64; a split
    launch gives the same bits at every call (its parts added in one order, whichever program comes last), and
    gemv_rows of it beside a second weight stays within the bound."""
    if split:
        cfg = dict(BN=16, BK=256, num_warps=4, num_stages=3, ACC2D=False, SPLIT=split)
        monkeypatch.setattr(kernels, "GEMV_ROW_CONFIGS", {torch.cuda.get_device_capability(): {
            (kind, shape): cfg for kind in ("int8", "w8aspike", "e4m3", "float") for shape in ("wide", "tall")}})
        kernels.row_tickets(torch.device("cuda"))   # a CUDA launch splits only where they were made before
    gen = torch.Generator().manual_seed(K + N)
    x = torch.randn(1, K, generator=gen)
    c, v = spike_quant_ref(x * torch.exp(torch.randn(1, K, generator=gen)), 3.0)
    q, sc, b = gemv_operands(1, K, N, 128, seed=N)[1:]
    bits, s8 = spiking.quantize_weight_fp8(torch.randn(N, K, generator=gen) / K ** 0.5)
    bits, s8 = bits.view(torch.uint8).cuda(), s8.view(N, 1).cuda()
    c, v = c.float().cuda(), v.float().cuda()
    for args in [(c, q, sc, 128, kernels.W_INT8, v, b), (c, bits, s8, K, kernels.W_E4M3, v, None),
                 (c, bits, s8, K, kernels.W_E4M3_BITS, v, b),
                 (x.bfloat16().cuda(), torch.randn(N, K, generator=gen).bfloat16().cuda(), None, K, kernels.W_FLOAT,
                  None, None)]:
        want, bound = row_twin(*args)
        y = kernels.gemv_row(*args, torch.float32)
        assert ((y.double() - want).abs() <= bound).all(), args[4]
        assert torch.equal(kernels.gemv_row(*args, torch.bfloat16), y.bfloat16())   # rounded to nearest, last
        if split:
            assert all(torch.equal(kernels.gemv_row(*args, torch.float32), y) for _ in range(3))
            x_, w, s, gs, fmt, vth, bias = args
            h = N // 2   # a second weight of the same shape class (wide or tall)
            ys = kernels.gemv_rows(x_, [w, w[:h]], [s, None if s is None else s[:h]], gs, fmt, vth,
                                   [bias, None if bias is None else bias[:h]], torch.float32)
            assert ((ys[0].double() - want).abs() <= bound).all()   # BN may differ from the single launch's
            assert ((ys[1].double() - want[:, :h]).abs() <= bound[:, :h]).all()
    if split:
        assert not kernels.row_tickets(torch.device("cuda")).any()


@needs_triton
@pytest.mark.parametrize("quant", ["int8", "w8aspike", "fp8"])
def test_quantized_model_decodes_the_same_tokens_through_the_gemv(quant, monkeypatch):
    """A tiny model whose projections are 8-bit layers (spiking.quantize_int8: INT8 weights, float activations;
    replace_linears: W8ASpike at k = 3; replace_linears_fp8): greedy decode with every step's projections through
    the decode GEMV (int8_gemv, w8aspike_gemv, fp8_gemv) gives the tokens of the layers' float reference path."""
    import spiking
    from model import GPT, Config, generate
    torch.manual_seed(0)
    m = GPT(Config.from_name("tiny")).to(DEV).eval()
    if quant == "int8":
        m = spiking.quantize_int8(m)
        assert not spiking._linears(m) and m.config.spike_k is None
        with pytest.raises(ValueError, match="INT8 weights already"):
            spiking.quantize_int8(m)
    else:
        m = (spiking.replace_linears if quant == "w8aspike" else spiking.replace_linears_fp8)(m, k=3.0)
    idx = torch.randint(0, m.config.vocab_size, (1, 12), device=DEV)
    for switch in ("INT8_GEMV_IMPL", "FP8_GEMV_IMPL", "SPIKE_GEMM_IMPL", "SPIKE_FP8_IMPL"):
        monkeypatch.setattr(kernels, switch, "torch")
    ref = generate(m, idx, 3, temperature=0)
    calls = spy(monkeypatch, f"{quant}_gemv")
    monkeypatch.setattr(kernels, "FP8_GEMV_IMPL" if quant == "fp8" else "INT8_GEMV_IMPL", "triton")
    assert generate(m, idx, 3, temperature=0) == ref and calls


@needs_triton
def test_fp8_gemv_tiles_that_do_not_fit_fall_back(monkeypatch):
    """The device's tiles (here a table entry for the CPU) fail to compile: one warning, INT8_GEMV_SAFE, within the
    bound."""
    monkeypatch.setattr(kernels, "_gemv8_kernel", too_big(kernels._gemv8_kernel, "BN", 64, 262144))
    monkeypatch.setattr(kernels, "options_failed", set())
    device_key = torch.cuda.get_device_capability() if CUDA else "cpu"
    monkeypatch.setattr(kernels, "FP8_GEMV_CONFIGS", {device_key: dict(BN=64, BK=64, num_warps=4, num_stages=2)})
    x, w8, s, b = fp8_operands(2, 200, 48, seed=4)
    with pytest.warns(UserWarning, match="fp8_gemv: kernel options .* do not compile"):
        y = kernels.fp8_gemv(x, w8, s, 3.0, b)
    assert_fp8_gemv_close(y, x, w8, s, 3.0, b)


@needs_triton
def test_fp8_gemv_without_an_e4m3_conversion_decodes_the_bits(monkeypatch):
    """A Triton whose e4m3 conversion does not compile (FMT 1): one warning, the integer decoding (FMT 2) from then
    on for that device, within the bound of the twin."""
    real, fmts = kernels._gemv8, []

    def no_e4m3(*a):
        fmts.append(a[7])
        if a[7] == 1:
            raise triton.compiler.errors.CompilationError(None, None, "no e4m3 type")
        return real(*a)
    monkeypatch.setattr(kernels, "_gemv8", no_e4m3)
    monkeypatch.setattr(kernels, "fp8_format_failed", set())
    monkeypatch.setattr(kernels, "SPIKE_GEMV_HALF", False)   # the e4m3 conversion alone (the fp16 path: below)
    x, w8, s, b = fp8_operands(2, 200, 48, seed=5)
    with pytest.warns(UserWarning, match="e4m3 conversion does not compile"):
        y = kernels.fp8_gemv(x, w8, s, 3.0, b)
    assert_fp8_gemv_close(y, x, w8, s, 3.0, b)
    assert_fp8_gemv_close(kernels.fp8_gemv(x, w8, s, 3.0, b), x, w8, s, 3.0, b)
    assert fmts == [1, 2, 2]


@needs_triton
@pytest.mark.parametrize("fp8", [False, True])
def test_spike_gemv_takes_count_rows_in_fp16_where_they_fit(monkeypatch, fp8):
    """The 8-bit GEMV multiplies the count rows in fp16 (int8 weights converted by integer operations, fp16 tl.dot,
    fp32 sums) where every count lies below 65504 (K k), else in tf32; both within the float64 twin's bound.
    SPIKE_GEMV_HALF = False takes tf32 always. Where the fp16 path does not compile: one warning, tf32 from then on."""
    dtypes, real = [], kernels._gemv8
    if fp8:
        x, w8, s, b = fp8_operands(2, 200, 48, seed=3, spread=1.0)
        run = lambda k: kernels.fp8_gemv(x, w8, s, k, b)
        check = lambda y, k: assert_fp8_gemv_close(y, x, w8, s, k, b)
    else:
        x, q, sc, b = gemv_operands(2, 200, 48, 128, seed=3)
        run = lambda k: kernels.w8aspike_gemv(x, q, sc, 128, k, b)
        check = lambda y, k: assert_w8aspike_gemv_close(y, x, q, sc, 128, k, b)

    def spy(xs, *a):
        dtypes.append(xs.dtype)
        if fail and xs.dtype == torch.float16:
            raise triton.compiler.errors.CompilationError(None, None, "no fp16 dot")
        return real(xs, *a)
    fail = False
    monkeypatch.setattr(kernels, "_gemv8", spy)
    monkeypatch.setattr(kernels, "gemv_half_failed", set())
    for k, want in ((3.0, torch.float16), (400.0, torch.float32)):   # K k = 600 and 80000
        dtypes.clear()
        check(run(k), k)
        assert dtypes == [want], (k, dtypes)
    monkeypatch.setattr(kernels, "SPIKE_GEMV_HALF", False)
    dtypes.clear()
    check(run(3.0), 3.0)
    assert dtypes == [torch.float32]
    monkeypatch.setattr(kernels, "SPIKE_GEMV_HALF", True)
    fail = True
    dtypes.clear()
    with pytest.warns(UserWarning, match="the fp16 path does not compile"):
        check(run(3.0), 3.0)
    check(run(3.0), 3.0)
    assert dtypes == [torch.float16, torch.float32, torch.float32]


def test_fp8_gemv_bad_inputs():
    x, w8, s, b = fp8_operands(2, 64, 48, seed=0)
    with pytest.raises(ValueError, match="at most 8 rows"):
        kernels.fp8_gemv(x.repeat(5, 1), w8, s, 3.0)
    with pytest.raises(ValueError, match=r"bits uint8 \[N, K\]"):
        kernels.fp8_gemv(x[:, :32], w8, s, 3.0)
    with pytest.raises(ValueError, match="scale"):
        kernels.fp8_gemv(x, w8, s[:4], 3.0)
    with pytest.raises(ValueError, match="k=0"):
        kernels.fp8_gemv(x, w8, s, 0)


@gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 8])
def test_gpu_w8aspike_gemv_7b_shape(M):
    """A 7B MLP projection (K=3584, N=18944, groups of 128), heavy-tailed activations with a count past 2^11 at k=3:
    the kernel within its bound of the float64 twin, and W8ASpikeLinear's bf16 decode output within bf16 rounding."""
    from spiking import W8ASpikeLinear
    x, qweight, scales, b = gemv_operands(M, 3584, 18944, 128, seed=M)
    x = x * torch.exp(torch.randn_like(x))
    x[-1, 5] = 1e5
    assert_w8aspike_gemv_close(kernels.w8aspike_gemv(x, qweight, scales, 128, 3.0, b), x, qweight, scales, 128, 3.0, b)
    m = W8ASpikeLinear(3584, 18944, True, 128, 3.0, device="cuda", dtype=torch.bfloat16)
    m.qweight.copy_(qweight)
    m.scales.copy_(scales)
    m.bias.copy_(b)
    xb = x.bfloat16()
    assert kernels.use_w8aspike_gemv(xb, 128, 3.0)
    with torch.no_grad():
        out = m(xb)
    c, v = spike_quant_ref(xb, 3.0)
    want = kernels.spike_linear_torch(c, v, qweight, scales, 128, m.bias, torch.float64)
    assert out.dtype == torch.bfloat16 and rms_err(out, want) < 4e-3


@gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 8])
def test_gpu_fp8_gemv_7b_shape(M):
    """A 7B MLP projection (K=3584, N=18944), heavy-tailed activations with a row past 448: the kernel (fp32 in and
    out) within its bound of the float64 twin, and FP8SpikeLinear's bf16 output (the CUDA decode path) within bf16
    rounding of it."""
    from spiking import FP8SpikeLinear
    x, w8, s, b = fp8_operands(M, 3584, 18944, seed=M, spread=1.0)
    x[-1, 5] = 1e4
    assert_fp8_gemv_close(kernels.fp8_gemv(x, w8, s, 3.0, b), x, w8, s, 3.0, b)
    m = FP8SpikeLinear(3584, 18944, True, 3.0, device="cuda", dtype=torch.bfloat16)
    m.fp8_weight.copy_(w8.view(torch.uint8))
    m.scales.copy_(s)
    m.bias.copy_(b)
    xb = x.bfloat16()
    assert kernels.use_fp8_gemv(xb)
    with torch.no_grad():
        out = m(xb)
    want = kernels.spike_linear_fp8_torch(xb, w8, s, 3.0, m.bias)
    assert out.dtype == torch.bfloat16 and rms_err(out, want) < 4e-3


# ----------------------------------------------------------------------------- 8-bit GEMVs in a compiled decode step

def fused_bound_ok(y, want, mag, K):
    """gemv8_fused's stated bound: |y - y64| <= (K + 2) 2^-24 sum |x q s| (+ the bias and the final products)."""
    err = (y.double() - want).abs()
    return y.shape == want.shape and bool((err <= (K + 6) * 2.0 ** -24 * mag).all())


@pytest.mark.parametrize("group_size,K", [(128, 200), (64, 256), (200, 200)])
def test_gemv8_fused_matches_float64(group_size, K):
    """The formula a compiled decode step hands to inductor, run as it is (eagerly): int8 weights in groups (a partial
    last group, several whole ones, one of all K) and e4m3 weights with one scale per output channel, within its
    bound of float64 on the same operands."""
    x, qweight, scales, _ = gemv_operands(3, K, 40, group_size, seed=K)
    y = kernels.gemv8_fused(x, qweight, scales, group_size)
    assert y.dtype == torch.float32
    assert fused_bound_ok(y, *int8_twin(x, qweight, scales, group_size, None), K)
    x, w8, s, _ = fp8_operands(3, K, 40, seed=K)
    y = kernels.gemv8_fused(x, w8.view(torch.uint8), s.view(40, 1), K, fp8=True)
    w64 = w8.double() * s.double()[:, None]
    assert fused_bound_ok(y, x.double() @ w64.T, x.double().abs() @ w64.abs().T, K)


def test_gemv8_fused_with_a_matrix_per_row_matches_float64():
    """gemv8_fused with w [M, N, K] and scales [M, N, G] (each row its own expert's matrix, as expert_rows indexes
    them): row m equals the float64 product with its own matrix, within the bound, for int8 groups and e4m3."""
    M, K, N = 3, 200, 24
    ops = [gemv_operands(1, K, N, 128, seed=40 + m) for m in range(M)]
    x, q, s = (torch.cat([o[0] for o in ops]), torch.stack([o[1] for o in ops]), torch.stack([o[2] for o in ops]))
    y = kernels.gemv8_fused(x, q, s, 128)
    for m in range(M):
        assert fused_bound_ok(y[m:m + 1], *int8_twin(x[m:m + 1], q[m], s[m], 128, None), K)
    f8 = [fp8_operands(1, K, N, seed=50 + m) for m in range(M)]
    x = torch.cat([o[0] for o in f8])
    y = kernels.gemv8_fused(x, torch.stack([o[1] for o in f8]).view(torch.uint8),
                            torch.stack([o[2] for o in f8])[..., None], K, fp8=True)
    for m, (_, w8, sc, _) in enumerate(f8):
        w64 = w8.double() * sc.double()[:, None]
        assert fused_bound_ok(y[m:m + 1], x[m:m + 1].double() @ w64.T, x[m:m + 1].double().abs() @ w64.abs().T, K)


@needs_triton
def test_8bit_gemvs_traced_take_the_fused_formula(monkeypatch):
    """Traced into a compiled graph (a compiled decode step), int8_gemv, w8aspike_gemv and fp8_gemv become
    gemv8_fused's tensor ops (inductor fuses them into one reduction; here aot_eager runs them as they are), no gemv8
    op in the graph, one graph each, within the stated bounds of their float64 twins; GEMV8_COMPILED "triton" keeps
    the op. Counts past 127 and past 16 (e4m3 rounding) included."""
    x, qweight, scales, b = gemv_operands(2, 200, 48, 128, seed=7)
    x = x * torch.exp(torch.randn_like(x))
    x[-1, 3] = 300.0
    x8, w8, s, b8 = fp8_operands(2, 200, 48, seed=8, spread=1.0)
    calls = spy(monkeypatch, "_gemv8_op")
    monkeypatch.setattr(kernels, "GEMV8_COMPILED", {"int8": "inductor", "fp8": "inductor"})
    runs = {"int8": lambda x: kernels.int8_gemv(x, qweight, scales, 128, b),
            "w8aspike": lambda x: kernels.w8aspike_gemv(x, qweight, scales, 128, 3.0, b),
            "fp8": lambda x: kernels.fp8_gemv(x, w8, s, 3.0, b8)}
    ys = {}
    for name, f in runs.items():
        step, graphs = fullgraph(f)
        with torch.no_grad():
            ys[name] = step(x8 if name == "fp8" else x)
        assert len(graphs) == 1 and not calls, name
    assert fused_bound_ok(ys["int8"], *int8_twin(x, qweight, scales, 128, b), 200)
    want, mag, counts = w8aspike_twin(x, qweight, scales, 128, 3.0, b)
    assert counts.abs().max() > 127
    assert fused_bound_ok(ys["w8aspike"], want, mag, 200)
    c, vth = spike_quant_ref(x8, 3.0)
    assert ((c.abs() > 16) & (c.abs() <= 448)).any()                     # counts e4m3 rounds
    assert fused_bound_ok(ys["fp8"], *fp8_twin(x8, w8, s, 3.0, b8), 200)
    monkeypatch.setattr(kernels, "GEMV8_COMPILED", {"int8": "triton", "fp8": "triton"})
    step, graphs = fullgraph(runs["int8"])
    with torch.no_grad():
        assert torch.equal(step(x), kernels.int8_gemv(x, qweight, scales, 128, b)) and calls


@gpu
@needs_cuda
@pytest.mark.parametrize("quant", ["int8", "w8aspike", "fp8"])
def test_gpu_8bit_gemvs_compiled_7b_shape(quant, monkeypatch):
    """A 7B MLP projection (K=3584, N=18944) at batch 1 in a decode step compiled as generate.py compiles it
    (kernels.compile_decode: inductor, coordinate-descent tuning, CUDA graphs): gemv8_fused within its bound of the
    float64 twin on the same operands."""
    monkeypatch.setattr(kernels, "GEMV8_COMPILED", {"int8": "inductor", "fp8": "inductor"})
    torch._dynamo.reset()
    if quant == "fp8":
        x, w8, s, b = fp8_operands(1, 3584, 18944, seed=3, spread=1.0)
        f, twin = (lambda x: kernels.fp8_gemv(x, w8, s, 3.0, b)), fp8_twin(x, w8, s, 3.0, b)
    else:
        x, q, sc, b = gemv_operands(1, 3584, 18944, 128, seed=3)
        if quant == "int8":
            f, twin = (lambda x: kernels.int8_gemv(x, q, sc, 128, b)), int8_twin(x, q, sc, 128, b)
        else:
            f, twin = (lambda x: kernels.w8aspike_gemv(x, q, sc, 128, 3.0, b)), w8aspike_twin(x, q, sc, 128, 3.0, b)[:2]
    step = kernels.compile_decode(f, torch.device("cuda"))
    with torch.no_grad():
        y = [step(x) for _ in range(3)][-1]
    assert fused_bound_ok(y, *twin, 3584)


def test_split_bias_projection_equals_float64(monkeypatch):
    """model.Linear's split-bias branch (a compiled batch-1 CUDA step: the bias-free GEMV, then the bias) gives
    x W^T + b of float64 as the fused F.linear does; use_split_bias takes neither an eager call, nor two rows, nor a
    projection without a bias, nor a CPU tensor in a compiled step."""
    torch.manual_seed(0)
    lin = model.Linear(40, 24, bias=True)
    x = torch.randn(1, 1, 40)
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    fused = lin(x)
    calls = []
    monkeypatch.setattr(kernels, "use_split_bias", lambda x, b: calls.append(x.shape) or b is not None)
    split = lin(x)
    assert calls == [(1, 1, 40)]
    for y in (fused, split):
        torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
    monkeypatch.undo()
    with torch.no_grad():
        assert not kernels.use_split_bias(x, lin.bias)                                   # eager
        traced, graphs = fullgraph(lambda x: x + kernels.use_split_bias(x, lin.bias))   # compiled, on a CPU
        assert torch.equal(traced(x), x) and graphs
    assert not kernels.use_split_bias(x, None) and not kernels.use_split_bias(torch.randn(2, 40), lin.bias)


def test_bench_decode_split_bias_flag(monkeypatch, capsys):
    """bench.py decode --split_bias false, --row_spikes true and --row_persistent N set kernels.GEMV_SPLIT_BIAS,
    GEMV_ROW_SPIKES and ROW_PERSISTENT for its run (the other halves of the A/Bs)."""
    import bench
    monkeypatch.setattr(kernels, "GEMV_SPLIT_BIAS", True)
    monkeypatch.setattr(kernels, "GEMV_ROW_SPIKES", False)
    monkeypatch.setattr(kernels, "ROW_PERSISTENT", 0)
    bench.bench_decode(tiny=True, split_bias=False, row_spikes=True, row_persistent=4096)
    assert kernels.GEMV_SPLIT_BIAS is False and kernels.GEMV_ROW_SPIKES is True and kernels.ROW_PERSISTENT == 4096
    assert "tok/s" in capsys.readouterr().out


def test_gemv_counts_flag_wide_rows_as_spiking_fp8_counts():
    """gemv_counts_torch (the one-row GEMV's counts) finds a row's largest count from its largest |x|: the same rows
    keep exact counts as spiking.fp8_counts finds from the counts themselves, for rows whose largest count lies
    around 448 (e4m3's largest) and its rounding ties."""
    t = torch.linspace(446.5, 450.5, 801, dtype=torch.float64)   # the outlier's count before rounding
    x = torch.ones(len(t), 64)
    x[:, 5] = (63 * t / (1024 - t)).float()                        # k = 16: vth = mean|x| / 16, count = x / vth
    # rows at ties, vth exactly 1 (k = 16, mean|x| = 16): 448.5 rounds to 448 (not wide: 17 -> 16), 449.5 to 450
    tie = torch.full((2, 64), 9.0)
    tie[:, :3] = torch.tensor([[448.5, 17.0, 9.5], [449.5, 17.0, 8.5]])
    x = torch.cat([x, tie])
    x[::2] *= -1
    counts, vth = kernels.gemv_counts_torch(x, 16.0, fp8=True)
    ref_counts, ref_vth = spiking.spike_quant(x, 16.0)
    ref = spiking.fp8_counts(ref_counts)
    wide = ref_counts.abs().amax(-1) > 448
    assert torch.equal(vth, ref_vth) and torch.equal(counts, ref) and 0 < wide.sum() < len(x)
    assert ref[-2:, :3].abs().tolist() == [[448, 16, 10], [450, 17, 8]] and vth[-2:].flatten().tolist() == [1, 1]
    if CUDA or os.environ.get("TRITON_INTERPRET") == "1":   # the counts gemv_row makes in its kernel: the same
        bits, sc = spiking.quantize_weight_fp8(torch.randn(8, 64, generator=torch.Generator().manual_seed(2)))
        w, sc = bits.view(torch.uint8).to(DEV), sc.view(8, 1).to(DEV)
        y = kernels.gemv_row(x.to(DEV), w, sc, 64, kernels.W_E4M3, None, None, torch.float32, 16.0)
        assert torch.equal(y, kernels.gemv_row(ref.to(DEV), w, sc, 64, kernels.W_E4M3, ref_vth.to(DEV), None,
                                               torch.float32))


CUDA_CORES = dict(BN=16, BK=64, num_warps=4, num_stages=2, DOT=False)   # the gemv8 kernel without tl.dot


@needs_triton
@pytest.mark.parametrize("fmt", [1, 2])
def test_gemv8_cuda_core_path_matches_float64(fmt, monkeypatch):
    """The gemv8 kernel with DOT false (products on the CUDA cores, rows not padded to 16) under every caller: int8
    weight-only at 1 and 3 rows (fp32 and fp16 x), W8ASpike's and FP8's count rows at 3 rows (6 with hi and lo),
    each within the bound its docstring states; every e4m3 byte decoded exactly in format fmt, every int8 one too."""
    monkeypatch.setattr(kernels, "INT8_GEMV_SAFE", CUDA_CORES)
    for M in (1, 3):
        x, qweight, scales, b = gemv_operands(M, 200, 48, 128, seed=30 + M)
        assert_gemv_close(kernels.int8_gemv(x, qweight, scales, 128, b), x, qweight, scales, 128, b)
        y16 = kernels.int8_gemv(x.half(), qweight, scales, 128, b)
        assert rms_err(y16, kernels.int8_gemv_torch(x.half(), qweight, scales, 128, b)) < 1e-3
    x = x * torch.exp(torch.randn_like(x))
    x[-1, 3] = 1e4
    assert_w8aspike_gemv_close(kernels.w8aspike_gemv(x, qweight, scales, 128, 12.0, b), x, qweight, scales, 128,
                               12.0, b)
    x8, w8, s, b8 = fp8_operands(3, 200, 48, seed=9, spread=1.0)
    monkeypatch.setattr(kernels, "fp8_format_failed", {str(x8.device)} if fmt == 2 else set())
    assert_fp8_gemv_close(kernels.fp8_gemv(x8, w8, s, 3.0, b8), x8, w8, s, 3.0, b8)
    bits = torch.arange(256, dtype=torch.int32)
    bits = torch.where((bits == 0x7F) | (bits == 0xFF), 0, bits).to(torch.uint8).view(16, 16).to(DEV)
    out = torch.full((16, 16), float("nan"), device=DEV)
    kernels._gemv8(torch.eye(16, device=DEV), bits, torch.ones(16, 1, device=DEV), out, 16, 1, CUDA_CORES, fmt, "ieee")
    assert torch.equal(out.T, bits.view(torch.float8_e4m3fn).float())
    q = torch.arange(-128, 128, dtype=torch.int32).to(torch.int8).view(16, 16).to(DEV)   # every int8 value, by the
    kernels._gemv8(torch.eye(16, device=DEV), q, torch.ones(16, 1, device=DEV), out, 16, 1, CUDA_CORES, 0, "ieee")
    assert torch.equal(out.T, q.float())                                                 # integer decoding

"""Speed and memory benchmarks (GPU). Every figure is printed beside a baseline measured in the same run.

    python bench.py kernels   # GLA kernels: ours vs fla vs pure PyTorch vs SDPA
    python bench.py ttft      # time to first token: spikingbrain-7b vs qwen2.5-7b
    python bench.py ttft --cp 2   # one prompt split over 2 GPUs (context parallelism) beside one GPU; a projection
    python bench.py decode    # decode tok/s and memory vs context length
    python bench.py serve     # serve.py under 1 / 8 / 32 streaming clients: TTFT, aggregate tok/s, memory per row
    python bench.py train     # training tokens/s and MFU
    python bench.py profile   # where the time goes: a training step, a prefill chunk, decode steps
    python bench.py swa       # softmax attention alone: SWA prefill on flex_attention, decode attention
    python bench.py moe       # one 76B MoE layer at real widths vs a dense FFN of the same active FLOPs
    python bench.py spike_gemm   # W8ASpike's projections: int8 spike counts x INT8 weights vs bf16 (and FP8)
    python bench.py gemv      # decode's batch-1 GEMVs: bf16 vs 8-bit weights, the gemv8 kernel's settings swept
    python bench.py ttft --quant int8; python bench.py decode --quant w8aspike   # quantized as generate/convert do
    python bench.py ttft --quant fp8   # spike counts x e4m3 weights on FP8 tensor cores (generate.py --quant fp8)
    python bench.py decode --quant fp8 # its decode steps: e4m3 weights read a byte each (kernels.fp8_gemv)
    python bench.py ttft --tiny true; python bench.py decode --tiny true   # CPU smoke runs of the same code
    python bench.py moe --tiny true
    python bench.py serve --tiny true; python bench.py gemv --tiny true

Each command is a bench_* function that prints what the functions above it measure and return. The model runs as
train.py and generate.py run it, through the library they share (model.py, kernels.py): the same forward, compiled
blocks, decode step and switches (kernels.GLA_IMPL, kernels.ATTN_IMPL, kernels.MOE_IMPL). The 76B does not fit one
GPU: --n_layer N (train, ttft, decode, profile) keeps N layers of every model at its real widths (first_layers).
"""
import datetime
import gc
import itertools
import math
import os
import random
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
from jsonargparse import CLI
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import convert
import kernels
import spiking
import tokenizer
from model import (GPT, LINEAR_MIXERS, MLP, Cache, Config, KVCache, Linear, MoE, attention, check_spike_k, gla_chunked,
                   gla_recurrent, layout_76b, moe_layers_76b)

try:   # optional: `bench.py kernels` times fla's chunk_gla beside ours when fla is installed; its header says which
    import fla
    from fla.ops.gla import chunk_gla as fla_chunk_gla
except ModuleNotFoundError as e:
    if e.name != "fla":
        raise
    fla = fla_chunk_gla = None

HERE = os.path.dirname(os.path.abspath(__file__))   # serve.py lies beside this file


# ----------------------------------------------------------------------------- shared pieces

def setup(device, gla):
    """Sets kernels.GLA_IMPL for the run; returns (cuda, dtype, device memory in bytes)."""
    kernels.GLA_IMPL = gla
    cuda = device.startswith("cuda")
    return (cuda, torch.bfloat16 if cuda else torch.float32,
            torch.cuda.get_device_properties(device).total_memory if cuda else float("inf"))


def synchronize(device):
    """Wait for the work queued on a CUDA device (before reading a clock); nothing to wait for on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def header(device, dt, gla, compile, what):
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {name} torch {torch.__version__} {dt}; GLA_IMPL={gla}; "
          f"compile={compile}; {what}")


def device_rate(device, what):
    """Measured in this run, beside every figure: "matmul" FLOP/s of an 8192^3 bf16 product, or "copy" bytes/s
    read + written by a 1 GiB device copy (small fp32 stand-ins on CPU)."""
    cuda = device.startswith("cuda")
    if what == "matmul":
        n = 8192 if cuda else 512
        dt = torch.bfloat16 if cuda else torch.float32
        a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
        fn, work, reps = (lambda: a @ b), 2 * n ** 3, (5, 50)
    else:
        a = torch.empty(2 ** 30 if cuda else 2 ** 24, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        fn, work, reps = (lambda: b.copy_(a)), 2 * a.numel(), (2, 10)
    for r in reps:                           # warm-up, then timed
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(r):
            fn()
        synchronize(device)
    return work * reps[-1] / (time.perf_counter() - t0)


def first_layers(preset, n_layer=None):
    """The preset's config at its widths with n_layer layers (None: all). The 7B and the baseline repeat one pattern:
    their first n layers. The 76B's first three layers are all dense FFNs with SWA, so a cut would time neither an
    expert nor full attention: it gets its layout rules at depth n instead (model.layout_76b, moe_layers_76b, as
    convert.py sizes it), the shares of MoE and full-attention layers near the full model's: 2 layers are a dense
    la+swa and an MoE la+fa; 4 are la+swa x 3 then la+fa, MoE in the last 3. Sinks and every other field stay the
    preset's."""
    c = Config.from_name(preset)
    n = n_layer or c.n_layer
    if preset == "spikingbrain-76b":
        return Config.from_name(preset, n_layer=n, layout=layout_76b(n), moe_layers=moe_layers_76b(n))
    return Config.from_name(preset, n_layer=n, layout=c.layout[:n], moe_layers=[i for i in c.moe_layers if i < n])


def describe(name, n_layer=None):
    """One line on first_layers(name, n_layer): mixers, MoE layers, sinks, active and total parameters."""
    c = first_layers(name, n_layer)
    with torch.device("meta"):
        m = GPT(c)
    return (f"# {name}: {c.n_layer} layers {' '.join(c.layout)}; MoE FFN in layers {c.moe_layers or 'none'}; "
            f"{c.n_sink} sinks; {m.num_params(active_only=True) / 1e9:.2f}B active of {m.num_params() / 1e9:.2f}B "
            "parameters")


def built(make, device, dt):
    """make() with its parameters created directly in `dt` on `device` (no float32 copy of a 7B model)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(default)


def random_model(name, device, dt, n_layer=None):
    """A preset (its first_layers(name, n_layer)) with random weights, made in `dt` on `device`."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    return built(lambda: GPT(first_layers(name, n_layer)), device, dt).eval()


Quant = Literal["bf16", "int8", "w8aspike", "fp8"]
SPIKE_K = 3.0   # --quant w8aspike's and fp8's activation k: convert.py w8aspike's default


def check_quant(quant):
    """A bad quant fails before a model is made (the CLI checks it too; this is for calls from Python)."""
    if quant not in Quant.__args__:
        raise ValueError(f"quant={quant!r}: choose one of {', '.join(Quant.__args__)}")


def quantize(m, quant):
    """m as it runs under `quant`, in place: "bf16" as it is (the float model; float32 on CPU); "int8" as
    generate.py --quant int8 makes it (spiking.quantize_int8: INT8 weights in groups of 128 for every projection,
    activations kept: weight-only for a float preset); "w8aspike" as convert.py w8aspike converts it
    (spiking.replace_linears at k = SPIKE_K, groups of 128, max scales: calibration picks other scales, not other
    work); either way every model.Linear becomes a spiking.W8ASpikeLinear. "fp8" as generate.py --quant fp8 makes
    it at k = SPIKE_K (spiking.replace_linears_fp8: e4m3 weights per output channel, spike counts as e4m3: on CUDA
    kernels.fp8_gemv for a decode step, torch._scaled_mm for more rows). Returns m."""
    check_quant(quant)
    if quant == "int8":
        return spiking.quantize_int8(m, group_size=128)
    if quant == "w8aspike":
        return spiking.replace_linears(m, k=SPIKE_K, group_size=128)
    if quant == "fp8":
        return spiking.replace_linears_fp8(m, k=SPIKE_K)
    return m


def decode_route(quant, device, rows=1):
    """The path a decode step's projections take under `quant` on device (rows: batch x new tokens), as the layers
    dispatch (FP8SpikeLinear.forward, W8ASpikeLinear.forward): for bench.py decode's header."""
    x = torch.empty(rows, 128, device=device)
    if quant == "fp8":
        return ("kernels.fp8_gemv (e4m3 bytes converted in registers)" if kernels.use_fp8_gemv(x, SPIKE_K) else
                "kernels.spike_linear_fp8 (torch._scaled_mm)" if kernels.use_spike_fp8(x) else
                "FP8SpikeLinear's float reference")
    if quant == "int8":
        return "kernels.int8_gemv" if kernels.use_int8_gemv(x, 128) else "dequantized weights, F.linear"
    if quant == "w8aspike":
        return ("kernels.w8aspike_gemv (int8 bytes converted in registers)"
                if kernels.use_w8aspike_gemv(x, 128, SPIKE_K) else
                "kernels.spike_linear" if kernels.use_spike_gemm(x) else "W8ASpikeLinear's float reference")
    return "F.linear"


def weight_bytes(m, skip=()):
    """Bytes of m's weights: parameters and buffers (a W8ASpikeLinear's INT8 weights, scales and bias are
    buffers), but those named in skip."""
    return sum(t.numel() * t.element_size() for n, t in (*m.named_parameters(), *m.named_buffers()) if n not in skip)


def linear_time(c):
    """No full-attention layer: the model prefills through its cache in chunks and its cache has one size."""
    return not any("fa" in c.mixers(i) for i in range(c.n_layer))


def prefill(m, cache, ids, chunk):
    """generate.py's prefill loop: ids [B, T] into the cache, `chunk` positions a forward. Returns the last
    position's logits [B, V]."""
    for a in range(0, ids.shape[1], chunk):
        logits = m(ids[:, a:a + chunk], cache=cache, last_only=True)[0]
    return logits[:, -1]


def greedy_steps(step, cache, tok, n, compiled):
    """n greedy decode steps from tok [B, 1] through `cache`, as generate.py's decode loop: `step` is model.forward,
    or it compiled by kernels.compile_decode (then each step begins a new CUDA-graph replay). Returns the last
    token."""
    for _ in range(n):
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        pos = torch.full((tok.shape[0], 1), cache.seen, device=tok.device)
        tok = step(tok, cache=cache, input_pos=pos, last_only=True)[0][:, -1].argmax(-1, keepdim=True)
        cache.seen += 1
    return tok


# ----------------------------------------------------------------------------- kernels

def kernel_ms(fn, fwd_only, grads):
    """Median ms of fn by triton.testing.do_bench (CUDA events, after warm-up); forward only under no_grad,
    else with `grads` zeroed between calls. NaN (and a note) when it runs out of memory."""
    try:
        if fwd_only:
            with torch.no_grad():
                return do_bench(fn, warmup=25, rep=200, return_mode="median")
        return do_bench(fn, warmup=25, rep=200, grad_to_none=grads, return_mode="median")
    except torch.OutOfMemoryError as e:
        print(f"  OOM: {str(e)[:120]}")
        torch.cuda.empty_cache()
        return float("nan")


def gla_kernel_times(t, B, H, Hkv, D, gate_norm):
    """Yields (impl, forward ms, forward+backward ms) of each GLA implementation at T = t on random bf16 inputs."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(t)
    q = torch.randn(B, t, H, D, device=dev, generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(B, t, Hkv, D, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    g = (F.logsigmoid(torch.randn(B, t, Hkv, D, device=dev, generator=gen)) / gate_norm).bfloat16()
    kr, vr, gr = (x.repeat_interleave(H // Hkv, 2) for x in (k, v, g))
    do = torch.randn_like(q)
    leaves = [x.requires_grad_() for x in (q, k, v, g, kr, vr, gr)]
    impls = {"ours": lambda: kernels.chunk_gla(q, k, v, g)[0]}
    if Hkv < H:
        impls["ours-rep"] = lambda: kernels.chunk_gla(q, kr, vr, gr)[0]
    if fla_chunk_gla is not None:                   # fla autotunes on its first call: minutes
        impls["fla"] = lambda: fla_chunk_gla(q, kr, vr, gr)[0]
    impls["torch"] = lambda: gla_chunked(q, kr, vr, gr)[0]
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, kr, vr))
    impls["sdpa"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    for name, fn in impls.items():
        grads, dout = ([qt, kt, vt], do.transpose(1, 2)) if name == "sdpa" else (leaves, do)
        yield name, kernel_ms(fn, True, grads), kernel_ms(lambda: fn().backward(dout), False, grads)


def decode_kernel_times(b, H, Hkv, D, gate_norm):
    """One decode token for b sequences with a state of [Hkv, D, D] each: ms of fused_recurrent_gla (GQA) and of
    the PyTorch gla_recurrent on states repeated to H heads."""
    q = torch.randn(b, 1, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, 1, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    g = (F.logsigmoid(torch.randn(b, 1, Hkv, D, device="cuda")) / gate_norm).bfloat16()
    s = torch.randn(b, Hkv, D, D, device="cuda")
    ours = do_bench(lambda: kernels.fused_recurrent_gla(q, k, v, g, initial_state=s, output_final_state=True),
                    return_mode="median")
    G = H // Hkv
    kr, vr, gr = (x.repeat_interleave(G, 2) for x in (k, v, g))
    sr = s.repeat_interleave(G, 1)
    ref = do_bench(lambda: gla_recurrent(q, kr, vr, gr, initial_state=sr, output_final_state=True),
                   return_mode="median")
    return ours, ref


def spike_quant_times(shape):
    """ms of spike quantization of bf16 activations [tokens, features]: kernels.spike_quant (torch.compile on
    CUDA) and its eager twin, fp32 counts then int8 counts."""
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    return [do_bench(lambda: fn(x, 3.0, int8=int8), return_mode="median")
            for int8 in (False, True) for fn in (kernels.spike_quant, kernels.spike_quant_torch)]


def bench_kernels(*, T: tuple[int, ...] = (4096, 16384, 65536), B: int = 1, H: int = 28, Hkv: int = 4, D: int = 128,
                  gate_norm: float = 16.0, extras: bool = True) -> None:
    """GLA at SpikingBrain-7B shapes, bf16: forward and forward+backward ms of our kernels with GQA (H query
    heads over Hkv states, as the model calls them) and on k, v, g repeated to H heads ("ours-rep"), fla's
    chunk_gla (when installed; repeated: it has no GQA), our pure-PyTorch gla_chunked and causal SDPA; a decode
    step; spike quantization.
    Gates are logsigmoid(randn) / gate_norm (16 is the model's normalizer). Times: median of
    triton.testing.do_bench (CUDA events, after warm-up), forward under no_grad. extras=False skips the
    decode and spike rows."""
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"triton {triton.__version__} fla {fla.__version__ if fla else 'not installed'}; B={B} H={H} Hkv={Hkv} "
          f"D={D} bf16, g = logsigmoid(randn)/{gate_norm}")

    def flops(t):                                 # fwd+bwd matmul flops of our chunked algorithm, C = 64
        C, n = kernels.CHUNK, B * H * triton.cdiv(t, kernels.CHUNK)
        return n * 7 * (2 * C * D * D + 2 * C * C * D)

    print(f"{'T':>6} {'impl':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'GB/s':>7}  (ours: fwd+bwd matmul "
          "flops, min bytes; fla row: ours / fla fwd+bwd)")
    io = B * H * D * 2                            # bytes of one [B, T, H, D] bf16 tensor, per position
    for t in T:
        res = {}
        for name, fwd, both in gla_kernel_times(t, B, H, Hkv, D, gate_norm):
            res[name] = (fwd, both)
            extra = f"{flops(t) / both / 1e9:8.1f} {14 * io * t / both / 1e6:7.0f}" if name == "ours" else ""
            ratio = f"  ours {res['ours'][1] / both:.2f}x" if name == "fla" else ""
            print(f"{t:>6} {name:>8} {fwd:9.3f} {both:11.3f} {extra:>16}{ratio}", flush=True)
        torch.cuda.empty_cache()
    if not extras:
        return
    for b in (1, 32):
        ours, ref = decode_kernel_times(b, H, Hkv, D, gate_norm)
        print(f"decode step, batch {b}: fused_recurrent_gla {ours * 1e3:.1f} us, PyTorch gla_recurrent "
              f"{ref * 1e3:.1f} us "
              f"({2 * b * Hkv * D * D * 4 / ours / 1e6:.0f} GB/s state read+write)")
    for shape in ((16384, 3584),):
        row = spike_quant_times(shape)
        print(f"spike_quant {shape}: fp32 counts compiled {row[0]:.3f} / eager {row[1]:.3f} ms; "
              f"int8 counts {row[2]:.3f} / {row[3]:.3f} ms")


# ----------------------------------------------------------------------------- spike counts on 8-bit tensor cores

def ms(fn, device, grads=()):
    """Median ms of fn, the .grad of `grads` dropped before each call: triton.testing.do_bench on CUDA (CUDA events,
    after warm-up), else one perf_counter call, no warm-up (CPU smoke runs: they check that each route runs, not its
    speed)."""
    if torch.device(device).type == "cuda":
        return do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median")
    for g in grads:
        g.grad = None
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def block_projections(preset):
    """The projections (model.Linear) of the preset's first block, {(in, out): [names]}, the names sharing a shape
    together: for spikingbrain-7b a GLA block's q, k, v, o, the gate's low-rank pair, gate, up and down."""
    with torch.device("meta"):
        block = GPT(first_layers(preset, 1)).blocks[0]
    shapes = {}
    for name, mod in block.named_modules():
        if isinstance(mod, Linear):
            shapes.setdefault((mod.in_features, mod.out_features), []).append(name.partition(".")[2])
    return shapes


def fp8_operands(counts, w):
    """FP8 (e4m3) operands of torch._scaled_mm for spike counts [M, K] and a weight [N, K]: the counts as they are
    (exact up to +-16; a larger one keeps 4 significant bits, e.g. 17 -> 16, 100 -> 96), the weight scaled per
    output channel to e4m3's range (max|w| -> 448: spiking.quantize_weight_fp8, FP8SpikeLinear's weights). Returns
    (counts e4m3, weight e4m3, weight scales [1, N] fp32)."""
    q, s = spiking.quantize_weight_fp8(w)
    return counts.float().to(torch.float8_e4m3fn), q.view(torch.float8_e4m3fn), s.view(1, -1)


def fp8_linear(a8, vth, b8, b_scale):
    """(a8 * vth) @ (b8 * b_scale)^T on FP8 tensor cores: a8 [M, K] and b8 [N, K] e4m3, row-wise scales vth [M, 1]
    and b_scale [1, N] fp32, fp32 sums; bf16 [M, N] (row-wise scaling takes no other output dtype on CUDA)."""
    return torch._scaled_mm(a8, b8.t(), scale_a=vth, scale_b=b_scale, out_dtype=torch.bfloat16)


def fp8_missing(device):
    """None if torch._scaled_mm multiplies e4m3 with row-wise scales on this device (CUDA capability 8.9 or
    later; CPUs in recent torch), else why not."""
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        fp8_linear(a, torch.ones(16, 1, device=device), a, torch.ones(1, 16, device=device))
        return None
    except Exception as e:   # a capability probe: whatever this torch or device lacks, the rows say so
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def spike_gemm_routes(x, w, k=3.0, group_size=128, fp8=True):
    """The routes bench.py spike_gemm times for one projection, x [M, K] through a weight w [N, K] to [M, N] in x's
    dtype (fp8: bf16), each a callable with its operands made beforehand; returns ({route: fn}, operands).
        bf16            x @ w.T: the float model's matmul (the baseline).
        spike_linear    kernels.spike_linear, the GEMM alone: x's int8 spike counts at k (spike_counts_int8) times
                        w's INT8 groups (W8ASpikeLinear.from_linear); on a CPU without TRITON_INTERPRET=1 its
                        twin spike_linear_torch.
        W8ASpikeLinear  the layer a w8aspike model runs, from x: spike quantization, the GEMM, the check for
                        counts past int8 (on CUDA kernels.w8aspike_linear; elsewhere the float reference).
        fp8             fp8_linear on fp8_operands of the same counts and thresholds (fp8=True only).
        FP8SpikeLinear  the layer an fp8 model runs, from x (fp8=True only): spike quantization to e4m3 counts,
                        torch._scaled_mm, the check for counts past 448 (kernels.spike_linear_fp8 where
                        kernels.use_spike_fp8, else its float reference).
    operands: counts, vth, wide (the rows with counts past 127), layer (the W8ASpikeLinear), fp8 (its operands),
    fp8_layer (the FP8SpikeLinear or None)."""
    K, N = x.shape[1], w.shape[0]
    with torch.device("meta"):
        linear = torch.nn.Linear(K, N, bias=False)
    linear.weight = torch.nn.Parameter(w, requires_grad=False)
    layer = spiking.W8ASpikeLinear.from_linear(linear, group_size, k)
    counts, vth, wide = kernels.spike_counts_int8(x, k)
    gemm = kernels.spike_linear if x.is_cuda or kernels.INTERPRET else kernels.spike_linear_torch
    routes = {"bf16": lambda: x @ w.T,
              "spike_linear": lambda: gemm(counts, vth, layer.qweight, layer.scales, layer.group_size,
                                           out_dtype=x.dtype),
              "W8ASpikeLinear": lambda: layer(x)}
    ops = dict(counts=counts, vth=vth, wide=wide, layer=layer, fp8=None, fp8_layer=None)
    if fp8:
        a8, b8, b_scale = ops["fp8"] = fp8_operands(counts, w)
        routes["fp8"] = lambda: fp8_linear(a8, vth, b8, b_scale)
        fp8_layer = ops["fp8_layer"] = spiking.FP8SpikeLinear.from_linear(linear, k)
        routes["FP8SpikeLinear"] = lambda: fp8_layer(x)
    return routes, ops


@torch.no_grad()
def bench_spike_gemm(*, preset: str = "spikingbrain-7b", rows: tuple[int, ...] = (8192, 32768), k: float = 3.0,
                     group_size: int = 128, fp8: bool = True, device: str = "cuda", tiny: bool = False) -> None:
    """W8ASpike's projections on 8-bit tensor cores vs bf16, one projection at a time at the preset's shapes (its
    first block's model.Linear layers) for `rows` tokens: x = randn activations (spike counts do not depend on
    their scale: the threshold is mean|x| / k), random weights. Routes (spike_gemm_routes): bf16 x @ w.T, the
    baseline; kernels.spike_linear alone on int8 counts and INT8 weights in groups of group_size; the whole
    W8ASpikeLinear from x (spike quantization included), as a w8aspike model runs it; FP8 (torch._scaled_mm on the
    counts in e4m3 and per-channel e4m3 weights, row-wise scales) where this torch and device have it, else a line
    says why. Each row: median ms (do_bench), 2 M N K / time (TFLOP/s for bf16, TOPS for the integer and FP8
    routes) and the bf16 time over the route's (> 1: faster); then the block's projections summed.
    Accuracy: tests/test_kernels.py, tests/test_bench.py (every route against float64).

    Args:
        preset: model.py preset whose projection shapes are timed.
        rows: tokens (M) per GEMM, e.g. prefill chunks.
        k: spike threshold parameter.
        group_size: input channels per INT8 weight scale.
        fp8: time the FP8 route too.
        device: cuda or cpu.
        tiny: CPU smoke run: the tiny preset, 64 rows.
    """
    check_spike_k(k, "k")
    spiking.check_group_size(group_size)
    if tiny:
        preset, rows, device = "tiny", (64,), "cpu"
    cuda = device.startswith("cuda")
    dt = torch.bfloat16 if cuda else torch.float32
    why_no_fp8 = fp8_missing(device) if fp8 else "off (--fp8 false)"
    gemm = "kernels.spike_linear" if cuda or kernels.INTERPRET else "its twin spike_linear_torch (no Triton here)"
    header(device, dt, "-", False, f"{preset} projections, x = randn, spike k={k}, INT8 groups of {group_size}; "
           f"spike_linear: {gemm}; triton {triton.__version__}; FP8: {why_no_fp8 or 'torch._scaled_mm e4m3, row-wise'}")
    shapes = block_projections(preset)
    print(f"{'projections':>22} {'M':>6} {'K':>6} {'N':>6} {'route':>15} {'ms':>9} {'T(FL)OP/s':>10} "
          f"{'vs bf16':>8}  counts", flush=True)
    torch.manual_seed(0)
    for M in rows:
        total = {}
        for (K, N), names in shapes.items():
            x = torch.randn(M, K, device=device, dtype=dt)
            w = (torch.randn(N, K, device=device) * K ** -0.5).to(dt)
            routes, ops = spike_gemm_routes(x, w, k, group_size, fp8=why_no_fp8 is None)
            c = ops["counts"].float().abs()
            note = f"max |count| {c.max().item():.0f}, rows past 127: {ops['wide'].sum().item()}"
            if ops["fp8"]:
                note += f", counts rounded in e4m3: {(ops['fp8'][0].float().abs() != c).float().mean().item():.2%}"
            del c
            t = {}
            for r, fn in routes.items():
                row = f"{','.join(names):>22} {M:>6} {K:>6} {N:>6} {r:>15}"
                try:
                    tr = ms(fn, device)
                except RuntimeError as e:   # a shape a library kernel does not take (e.g. FP8's): say so, go on
                    total[r] = float("nan")
                    print(f"{row} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
                    continue
                t[r] = tr
                total[r] = total.get(r, 0.0) + tr * len(names)
                print(f"{row} {tr:9.3f} {2 * M * N * K / tr / 1e9:10.1f} {t['bf16'] / tr:7.2f}x  "
                      f"{note if r == 'spike_linear' else ''}", flush=True)
            del x, w, routes, ops
            if cuda:
                torch.cuda.empty_cache()
        n = sum(len(v) for v in shapes.values())
        print(f"block's {n} projections, M={M}: " + ", ".join(f"{r} {tr:.3f} ms ({total['bf16'] / tr:.2f}x)"
                                                             for r, tr in total.items()), flush=True)


# ----------------------------------------------------------------------------- time to first token

@torch.no_grad()
def time_to_first_token(m, T, chunk, layers=None, ids=None):
    """Seconds from a random T-token prompt (or the prompt ids [1, T]) to its first greedy token on m's first
    `layers` blocks (None: all), the peak device bytes (0 off CUDA) and the last position's logits [V] (the token:
    their argmax). A linear-time model prefills
    through a cache, `chunk` tokens a forward; a full-attention model runs the prompt in one forward without a
    cache."""
    c, device = m.config, m.lm_head.weight.device
    cuda = device.type == "cuda"
    ids = torch.randint(0, c.vocab_size, (1, T), device=device) if ids is None else ids.to(device)
    blocks, m.blocks = m.blocks, m.blocks[:layers]
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        synchronize(device)
        t0 = time.perf_counter()
        if linear_time(c):
            logits = prefill(m, m.new_cache(1, T), ids, chunk)
        else:
            logits = m(ids, last_only=True)[0][:, -1]
        logits[0].argmax().item()   # the token, on the host: the clock stops with it
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() if cuda else 0, logits[0]
    finally:
        m.blocks = blocks


def extrapolate(done, T):
    """Seconds at T from a*T + b*T^2 through the last two (T, seconds, peak) measurements in done, b >= 0."""
    if len(done) == 1:
        return done[0][1] * (T / done[0][0]) ** 2    # all quadratic: an upper bound
    (T1, t1, _), (T2, t2, _) = done[-2], done[-1]
    b = max((t2 / T2 - t1 / T1) / (T2 - T1), 0.0)
    return (t2 / T2 - b * T2) * T + b * T * T


def ttft_at(m, T, done, chunk, budget_s, mem, compile):
    """TTFT of m at T: (seconds, peak bytes or None, note), or None when out of memory. Measured when the guess
    from `done` (the (T, seconds, peak) measured so far, which this extends) fits budget_s and memory `mem`; else
    a linear-time model is timed on fewer layers and scaled, a full-attention model extrapolated (also when its
    activations run out of memory). The note says so."""
    c, cached = m.config, linear_time(m.config)
    weights = weight_bytes(m)
    guess, need = 0.0, 0.0
    if done:
        T1, t1, p1 = done[-1]
        guess = t1 * T / T1 if cached else extrapolate(done, T)
        need = weights + (p1 - weights) * T / T1
    through = f"a*T + b*T^2 through T={done[-2][0]}, {done[-1][0]}" if len(done) >= 2 else ""
    try:
        if not cached and len(done) >= 2 and (guess > budget_s or need > 0.92 * mem):
            why = f"> {budget_s:.0f} s" if guess > budget_s else f"needs ~{need / 2**30:.0f} GiB"
            return extrapolate(done, T), None, f"extrapolated ({why}): {through}"
        if cached and guess > budget_s:
            k = max(2, int(c.n_layer * budget_s / guess) // 2 * 2)   # an even count keeps the layer mix
            t, peak, _ = time_to_first_token(m, T, chunk, k)
            return t * c.n_layer / k, peak, f"measured on {k} of {c.n_layer} layers, scaled by {c.n_layer / k:.1f}"
        t, peak, _ = time_to_first_token(m, T, chunk)
        if compile:                              # a first length past a size guard recompiles: time it again
            t = min(t, time_to_first_token(m, T, chunk)[0])
        done.append((T, t, peak))
        return t, peak, ""
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        if cached or len(done) < 2:
            return None
        return extrapolate(done, T), None, f"extrapolated (out of memory): {through}"


def bench_ttft(*, lengths: tuple[int, ...] = (8192, 32768, 131072, 524288, 1048576),
               models: tuple[str, ...] = ("spikingbrain-7b", "qwen2.5-7b"), chunk: int = 32768,
               budget_s: float = 60.0, sweep: tuple[int, ...] = (), gla: str = "auto", compile: bool = False,
               n_layer: int | None = None, quant: Quant = "bf16", device: str = "cuda", tiny: bool = False,
               cp: int = 1, project_to: int = 1048576, cse: bool = False) -> list[dict] | None:
    """Time to first token: prefill of a random prompt plus the first greedy token, random weights (bf16 on GPU).

    A model without full attention prefills through its cache in chunks of `chunk` tokens, as generate.py does.
    A full-attention model (the baseline) runs the prompt in one forward pass without a cache, on SDPA's fastest
    causal kernel: its best case. Each TTFT is printed beside its floor, 2 * active non-embedding params (an MoE
    token's routed and shared experts) * T / the bf16 matmul rate measured in this run. What would take longer than
    budget_s is not run as is: a linear-time model is timed on fewer layers and scaled; a full-attention model is
    extrapolated by a*T + b*T^2 through its last two measurements (also when its activations would not fit in
    memory). Such figures are marked.

    Args:
        lengths: prompt lengths in tokens.
        models: presets of model.py.
        chunk: prefill chunk of the cached (linear-time) path.
        budget_s: longest single measurement.
        sweep: chunk sizes to time first, each on a min(128k, longest)-token prompt (e.g. '[8192,16384,32768,65536]').
        gla: kernels.GLA_IMPL ("auto": Triton kernels on CUDA; "torch": the PyTorch path).
        compile: torch.compile every block of both models, as generate.py --compile (compiled in the warm-up;
            each length is timed twice, the faster counts: a new size may recompile once).
        n_layer: keep n layers of every model (first_layers), e.g. the 76B at real widths on one GPU:
            --models '[spikingbrain-76b,qwen2.5-7b]' --n_layer 4 (the 76B's full-attention layer makes it quadratic:
            one forward without a cache, as the baseline).
        quant: every model's projections as `quantize` makes them: bf16 (as they are), int8 (weight-only INT8, as
            generate.py --quant int8: a prefill dequantizes each weight to bf16 first) or w8aspike (spike counts x
            INT8 weights, as convert.py w8aspike: on CUDA kernels.spike_linear) or fp8 (spike counts x e4m3
            weights, as generate.py --quant fp8: on CUDA kernels.spike_linear_fp8). The floor stays the float
            model's: its non-embedding parameters at the bf16 matmul rate.
        device: cuda or cpu.
        tiny: CPU smoke run: tiny models, short prompts.
        cp: split each prompt over cp processes (context parallelism, one GPU each; gloo processes on a CPU) and
            time it beside one process on the same prompt: `ttft_split`. Returns its rows.
        project_to: with cp, the prompt length of the projection to 8 / 32 / 128 GPUs.
        cse: with compile, the blocks' common subexpressions merged (kernels.decode_cse: one spike-count pass per
            input that several projections read); false: as inductor compiles them (the other half of an A/B).
    """
    check_quant(quant)
    if tiny:
        models, lengths, chunk, budget_s, device = ("tiny", "tiny-qwen"), (64, 256, 1024), 128, 5.0, "cpu"
    if cp > 1:
        if compile or sweep:
            raise ValueError("--cp times the eager model on one chunk size: drop --compile and --sweep")
        return ttft_split(models, lengths, chunk, gla, n_layer, quant, device, cp, project_to)
    cuda, dt, mem = setup(device, gla)
    rate = device_rate(device, "matmul")
    header(device, dt, gla, f"{compile}{' (common subexpressions merged)' if compile and cse else ''}",
           f"quant {quant}; {8192 if cuda else 512}^3 matmul: {rate / 1e12:.3g} TFLOP/s; "
           f"chunk {chunk}; budget {budget_s:.0f} s; layers {n_layer or 'all'}")
    print("\n".join(describe(name, n_layer) for name in models))
    print(f"{'model':>16} {'T':>8} {'TTFT s':>9} {'tok/s':>9} {'floor s':>8} {'/floor':>7} {'peak GiB':>9}  note",
          flush=True)
    ttft = {}
    for name in models:
        m = random_model(name, device, dt, n_layer)
        cached = linear_time(m.config)
        params = m.num_params(active_only=True, embeddings=False)   # before INT8 weights become buffers
        quantize(m, quant)
        if compile:
            torch._dynamo.reset()
            kernels.compile_blocks(m, {"post_grad_custom_pre_pass": kernels.decode_cse(realize=False)} if cse else None)
        t0 = time.perf_counter()
        time_to_first_token(m, min(lengths), chunk)       # warm-up: kernel compilation and autotuning at every shape
        if cached and max(lengths) > chunk:
            time_to_first_token(m, 2 * chunk, chunk)
        # a second length: torch.compile's graphs (compile; and flex_attention's, which a model without a cache,
        # such as the 76B with its full-attention layers, calls at the prompt's length) recompile once for any length
        time_to_first_token(m, min(lengths) // 2, chunk)
        print(f"{name:>16} warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        for ch in sweep if cached else ():
            T = min(131072, max(lengths))
            time_to_first_token(m, min(T, 2 * ch), ch)    # compile this chunk size's shapes first
            print(f"{name:>16} {T:>8} {time_to_first_token(m, T, ch)[0]:9.3f} s with chunk {ch}", flush=True)
        done, ttft[name] = [], {}
        for T in lengths:
            r = ttft_at(m, T, done, chunk, budget_s, mem, compile)
            if r is None:
                print(f"{name:>16} {T:>8} out of memory", flush=True)
                continue
            t, peak, note = ttft[name][T] = r
            floor = 2 * params * T / rate
            mem_s = f"{peak / 2**30:9.1f}" if peak else f"{'-':>9}"
            print(f"{name:>16} {T:>8} {t:9.3f} {T / t:9.0f} {floor:8.3f} {t / floor:7.2f} {mem_s}  {note}", flush=True)
        del m
    if len(models) >= 2:
        lin, base = models[0], models[-1]
        print(f"\n{'T':>8} {lin:>16} {base:>16} {'speedup':>8}   (* = scaled or extrapolated)")
        for T in lengths:
            if T in ttft[lin] and T in ttft[base]:
                (a, _, na), (b, _, nb) = ttft[lin][T], ttft[base][T]
                print(f"{T:>8} {a:15.3f}{'*' if na else ' '} {b:15.3f}{'*' if nb else ' '} {b / a:8.1f}x")


# ----------------------------------------------------------------------------- time to first token, split over ranks

# the report's sequence-parallel TTFT, as SPEC.md section 6 gives it (the report's Table 7)
REPORT_SPLIT_TTFT = ("H100, sequence parallel, 7B: ~1.0-1.07 s from 256k to 4M tokens on 8-128 GPUs; Qwen2.5-7B "
                     "7.4 s / 14.4 s / 27.9 s at 256k / 512k / 1M")


def splittable(c):
    """Does ttft --cp time this config? Not with full attention ('fa'): its gathers (every rank's keys) grow with the
    prompt, unlike the fixed sends split_collectives times and project_split scales."""
    return all(k != "fa" for i in range(c.n_layer) for k in c.mixers(i))


@torch.no_grad()
def split_ttft(m, ids, group, chunk):
    """Seconds from a start synchronized on every rank of `group` to the first greedy token of ids [1, T] split over
    them, when every rank is done: the prompt in rounds of about n x chunk tokens through a fresh cache, rank r
    prefilling the r-th slice of each round, the last rank's cache shared between rounds (kernels.cp_prefill, as
    generate.py --cp); the last rank, whose cache then holds the whole prompt's state, takes the token. Returns
    (seconds, the token on the last rank and -1 elsewhere, this rank's peak device bytes or 0)."""
    rank, n, device = dist.get_rank(group), dist.get_world_size(group), m.lm_head.weight.device
    T, cuda = ids.shape[1], device.type == "cuda"
    x = ids.to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier(group)
    synchronize(device)
    t0 = time.perf_counter()
    logits = kernels.cp_prefill(m, m.new_cache(1, T), x, group, chunk)
    tok = logits.argmax(-1).item() if rank == n - 1 else -1
    synchronize(device)
    dist.barrier(group)
    return time.perf_counter() - t0, tok, torch.cuda.max_memory_allocated(device) if cuda else 0


def split_collectives(c, device, dt):
    """What one rank sends in a split forward's all_gathers, in their order (B = 1): its slice length and last
    document (cp_start), then per layer each linear branch's state and decay (cp_linear, float32) and each SWA
    branch's last `window` keys and values (cp_attention), the first SWA branch their positions and documents before
    them (cp_before)."""
    parts, first = [torch.zeros(1, 3, dtype=torch.long, device=device)], True
    for i in range(c.n_layer):
        for kind in c.mixers(i):
            if kind in LINEAR_MIXERS:
                parts.append(torch.zeros(1, c.n_kv_head, c.head_dim, c.head_dim + 1, device=device))
            else:
                if first:
                    parts.append(torch.zeros(1, c.window, 2, dtype=torch.long, device=device))
                    first = False
                parts.append(torch.zeros(1, c.window, c.n_kv_head, 2 * c.head_dim, device=device, dtype=dt))
    return parts


def comm_seconds(fn, group, device, reps=5):
    """Median seconds of fn() (collectives over `group`) alone: a split prefill's communication without its compute
    (the forward waits on each collective, so the two add up). The first repetition warms up."""
    times = []
    for _ in range(reps + 1):
        dist.barrier(group)
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def rank_max(x, device, group):
    """The largest of every rank's integer x: every rank decides alike (a rank that skips alone would hang the rest)."""
    t = torch.tensor([x], device=device)
    dist.all_reduce(t, dist.ReduceOp.MAX, group)
    return int(t)


def split_worker(group, device, out, models, lengths, chunk, gla, n_layer, quant):
    """One rank of ttft_split (kernels.cp_launch): every model, every length, rows printed on rank 0 and saved to
    `out`."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    say = print if rank == 0 else lambda *a, **k: None
    _, dt, mem = setup(device, gla)
    rows = []
    for name in models:
        m = quantize(random_model(name, device, dt, n_layer), quant)
        weights, parts = weight_bytes(m), split_collectives(m.config, device, dt)

        def prompt(T, V=m.config.vocab_size):   # the same on every rank
            return torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(T))
        t0 = time.perf_counter()   # warm-up: two lengths, so that flex_attention's dynamic recompile is done
        for T in (min(lengths), 2 * min(lengths)):
            peak = split_ttft(m, prompt(T), group, chunk)[2]
        done = (2 * min(lengths), rank_max(peak, device, group))
        if rank == 0:
            time_to_first_token(m, min(lengths), chunk, ids=prompt(min(lengths)))
            if max(lengths) > chunk:
                time_to_first_token(m, 2 * chunk, chunk, ids=prompt(2 * chunk))
        dist.barrier(group)
        say(f"{name:>16} warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        def slice_len(T):   # the longest slice a rank prefills in one forward: a round's share
            return -(-kernels.cp_round_ends(T, n, chunk)[0] // n)
        for T in lengths:
            S = slice_len(T)   # peak memory grows with it: skip what would not fit, on all ranks
            need = weights + (done[1] - weights) * S / slice_len(done[0])
            if need > 0.92 * mem:
                say(f"{name:>16} {T:>8} skipped: each rank prefills slices of {S} tokens in one forward, "
                    f"~{need / 2**30:.0f} GiB; a smaller --chunk makes them shorter", flush=True)
                continue
            ids = prompt(T)
            try:
                t, tok, peak = split_ttft(m, ids, group, chunk)
            except torch.OutOfMemoryError as e:   # the other ranks wait in a gather: stop the run
                raise RuntimeError(f"rank {rank}: out of memory prefilling a slice of {S} tokens in one forward: "
                                   f"use a smaller --chunk or shorter --lengths") from e
            tok, peak = rank_max(tok, device, group), rank_max(peak, device, group)   # the last rank's token
            done = (T, peak)
            t1, tok1, gap, top2 = 0.0, -1, 0.0, 0.0
            if rank == 0:   # where the split's token stands among one process's logits: a near tie or not
                t1, _, logits = time_to_first_token(m, T, chunk, ids=ids)
                logits = logits.float()
                tok1, (a, b) = logits.argmax().item(), logits.topk(2).values.tolist()
                gap, top2 = (logits[tok1] - logits[tok]).item(), a - b
            rounds, cache = len(kernels.cp_round_ends(T, n, chunk)), m.new_cache(1, T)
            gathers = comm_seconds(lambda: [kernels.cp_gather(p, group) for p in parts], group, device)
            share = comm_seconds(lambda: kernels.cp_share_cache(cache, group), group, device) if rounds > 1 else 0.0
            comm = rounds * gathers + (rounds - 1) * share   # a round's gathers, a cache shared between rounds
            del cache
            row = dict(model=name, T=T, ranks=n, chunk=chunk, split=t, one=t1, comm=comm, gathers=gathers,
                       share=share, token=tok,
                       token_one=tok1, token_gap=gap, top2=top2, peak=peak)
            rows.append(row)
            if rank == 0:   # the one-process figures are rank 0's
                mem_s = f"{peak / 2**30:9.1f}" if peak else f"{'-':>9}"
                print(f"{name:>16} {T:>8} {n:>5} {t:9.3f} {t1:9.3f} {t / t1:6.2f} {comm:9.4f} "
                      f"{comm / t:6.1%} {mem_s} {'yes' if tok == tok1 else 'no':>6} {gap:9.4f} {top2:9.4f}",
                      flush=True)
        del m
    if rank == 0:
        torch.save(rows, out)


def project_split(row, T, gpus=(8, 32, 128)):
    """Projection, not a measurement: TTFT of a T-token prompt split over P GPUs, from one measured split `row`
    (bench_ttft --cp). Compute (the split time less its communication) runs per token of a slice: it scales as
    T / P. A round's gathers hand every rank the P - 1 other ranks' states and keys: their time scales as
    (P - 1) / (n - 1), at the rate measured here (one host's links; between hosts it is slower); P GPUs run
    kernels.cp_round_ends(T, P, chunk) rounds, with the cache shared (broadcast, timed here) between them. Returns
    [(P, compute, communication)] in seconds, P = 1 being the one-process time scaled to T."""
    n, Tm = row["ranks"], row["T"]
    compute = max(row["split"] - row["comm"], 0.0) * n / Tm
    out = [(1, row["one"] * T / Tm, 0.0)]
    for P in gpus:
        R = len(kernels.cp_round_ends(T, P, row["chunk"]))
        out.append((P, compute * T / P, R * row["gathers"] * (P - 1) / (n - 1) + (R - 1) * row["share"]))
    return out


def ttft_split(models, lengths, chunk, gla, n_layer, quant, device, n, project_to):
    """bench_ttft --cp n: each prompt split over n processes (context parallelism: one GPU each, NCCL; gloo on a
    CPU) in rounds of n x chunk tokens (kernels.cp_prefill, as generate.py --cp), rank r prefilling the r-th slice
    of each, the last rank taking the first greedy token; beside it the same model
    on the same prompt in one process (rank 0's device, chunks of `chunk`), the ratio (the aim: <= 0.55 on 2 GPUs),
    its communication timed alone and its share, whether the split's first token is one process's.
    Then a projection to 8 / 32 / 128 GPUs at project_to tokens (project_split) beside the report's figures.
    Models with full attention are skipped with a note (splittable). Returns the rows."""
    kernels.cp_check_devices(n, device)   # before the header: a refused run prints nothing
    cuda = device.startswith("cuda")
    _, dt, _ = setup(device, gla)
    ranks = f"{n} GPUs (NCCL)" if cuda else f"{n} gloo processes"
    header(device, dt, gla, False, f"quant {quant}; one prompt split over {ranks}; one process: chunk {chunk}; "
           f"layers {n_layer or 'all'}")
    for name in models:
        if not splittable(first_layers(name, n_layer)):
            print(f"# {name}: skipped, full attention ('fa'): its gathers grow with the prompt (splittable)")
    models = [name for name in models if splittable(first_layers(name, n_layer))]
    if not models:
        return []
    print("\n".join(describe(name, n_layer) for name in models))
    print(f"{'model':>16} {'T':>8} {'ranks':>5} {'split s':>9} {'1 proc s':>9} {'ratio':>6} "
          f"{'comm s':>9} {'share':>6} {'peak GiB':>9} {'token':>6} {'gap':>9} {'top2':>9}  (split: rounds of "
          f"{n} x {chunk} tokens, a slice of {chunk} a rank; ratio: split / one process, aim <= 0.55 at 2 ranks; "
          "comm: every round's gathers and the cache shared between rounds, timed alone; peak: largest rank's; "
          "token: the split's first token is one "
          "process's; gap: one process's logit of its token less that of the split's token; top2: its top two "
          "logits' difference)", flush=True)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.pt")
        kernels.cp_launch(split_worker, n, device, out, models, lengths, chunk, gla, n_layer, quant,
                          timeout=datetime.timedelta(minutes=30))   # rank 0 alone times one process meanwhile
        rows = torch.load(out) if os.path.exists(out) else []
    for name in models:
        row = max((r for r in rows if r["model"] == name), key=lambda r: r["T"], default=None)
        if row is None:
            continue
        print(f"\n# projection, not a measurement: {name}, {project_to} tokens, from T={row['T']} on {row['ranks']} "
              f"ranks: compute (split - comm) x T / P; each round's gathers x (P - 1) / ({row['ranks']} - 1) at this "
              "run's link rate (between hosts slower), rounds of P x chunk tokens, the cache shared between them; "
              "P = 1: one process scaled to T")
        print(f"{'GPUs':>6} {'compute s':>10} {'comm s':>10} {'TTFT s':>8}")
        for P, comp, comm in project_split(row, project_to):
            print(f"{P:>6} {comp:10.3f} {comm:10.4f} {comp + comm:8.3f}")
    print(f"# the report (Table 7): {REPORT_SPLIT_TTFT}")
    return rows


# ----------------------------------------------------------------------------- decode

@torch.no_grad()
def synthetic_cache(m, B, ctx, max_len):
    """A cache of max_len positions per row holding ctx tokens of context as a prefill would leave it: random keys
    and values in the slots it would have written, with their positions; random GLA states."""
    c, w = m.config, m.lm_head.weight
    cache, kv = m.new_cache(B, max_len), {}
    for layer in cache.layers:
        if hasattr(layer, "state"):
            layer.state.normal_()
        if hasattr(layer, "kv"):
            n = min(ctx, layer.kv.capacity)
            if n not in kv:
                kv[n] = torch.randn(B, n, c.n_kv_head, c.head_dim, device=w.device, dtype=w.dtype)
            pos = torch.arange(c.n_sink + ctx - n, c.n_sink + ctx, device=w.device)
            layer.kv.write(kv[n], kv[n], pos, torch.zeros_like(pos))
            if c.n_sink:
                sink = torch.arange(c.n_sink, device=w.device)
                layer.kv.write(kv[n][:, :c.n_sink], kv[n][:, :c.n_sink], sink, sink * 0 - 1)
    cache.seen = c.n_sink + ctx
    return cache


def weight_bytes_read(m, B):
    """Weight bytes a decode step of B rows reads: every weight once, except the embedding table (B rows of it) and
    an MoE layer's routed experts that no row picks; B * top_k picks, uniform over the experts, leave
    E * (1 - (1 - top_k / E)^B) of them read (random weights route near uniformly)."""
    c = m.config
    n = weight_bytes(m, skip=("embed.weight",))
    if c.moe_layers:
        expert = weight_bytes(m.blocks[c.moe_layers[0]].mlp.experts) / c.n_expert   # one routed expert's
        n -= len(c.moe_layers) * c.n_expert * (1 - c.top_k / c.n_expert) ** B * expert
    return n


WARM_S, WARM_MAX, WINDOWS = 1.0, 1024, 3   # time_decode on CUDA: seconds (at most steps) of warm-up, timed windows


@torch.no_grad()
def time_decode(step, cache, tok, warm, steps, compiled, warm_s=0.0, windows=1):
    """Seconds per greedy decode step of `step` through `cache` from tok [B, 1]: the median of `windows` windows of
    `steps` steps, timed after `warm` warm-up steps (with compile: the compile) and then warm_s seconds more of
    steps (at most WARM_MAX), so that no window holds the GPU's first steps after an idle compile. Also the warm-up's
    seconds (the compile), the peak device bytes (0 off CUDA) and each window's seconds per step: their spread shows
    whether a process's speed held (it did within 0.5% on an H200, where processes differed by up to ~8%:
    BENCHMARKS.md)."""
    device = tok.device
    if compiled:
        kernels.static_cache(cache)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_warm = time.perf_counter()
    tok = greedy_steps(step, cache, tok, warm, compiled)
    synchronize(device)
    t0, more = time.perf_counter(), 0
    while time.perf_counter() - t0 < warm_s and more + 16 <= WARM_MAX:   # never past WARM_MAX: the cache's room
        tok = greedy_steps(step, cache, tok, 16, compiled)
        synchronize(device)
        more += 16
    per = []
    for _ in range(windows):
        t1 = time.perf_counter()
        tok = greedy_steps(step, cache, tok, steps, compiled)
        synchronize(device)
        per.append((time.perf_counter() - t1) / steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return statistics.median(per), t0 - t_warm, peak, per


def bench_decode(*, contexts: tuple[int, ...] = (1024, 32768, 131072), batches: tuple[int, ...] = (1, 8),
                 models: tuple[str, ...] = ("spikingbrain-7b", "qwen2.5-7b"), steps: int = 64,
                 compile: bool = False, gemv: bool = True, gla: str = "auto", n_layer: int | None = None,
                 quant: Quant = "bf16", gemv_half: bool = True, gemv8: Literal["inductor", "triton"] | None = None,
                 inductor: dict | None = None, realize_inputs: bool = False, gemv_row: bool = True,
                 row_configs: dict | None = None, split_bias: bool = True, cse: bool = True,
                 group_rows: bool = True, row_spikes: bool = False, row_counts: bool = False,
                 row_persistent: int = kernels.ROW_PERSISTENT, realize_gemv: bool = kernels.REALIZE_GEMV_INPUTS,
                 realize_norms: bool = kernels.REALIZE_GEMV_NORMS,
                 device: str = "cuda", tiny: bool = False) -> None:
    """Decode speed at each context length and batch size (greedy, the model's forward with input_pos as
    generate.py steps it), random weights (bf16 on GPU), beside the bandwidth bound: (weight bytes + cache bytes)
    read per step / the HBM bandwidth measured in this run by a large device copy (weight_bytes_read: of an MoE
    layer's routed experts, only those the rows pick). Also peak memory. The weight bytes are those of the model as
    timed: with --quant, the 8-bit weights and their scales.

    The context is filled synthetically, not prefilled: random keys and values in the slots a prefill of that
    length would have written (with their positions) and random GLA states; a step's cost depends on those
    shapes and positions, not on the values. Caches are sized as generate.py sizes them: a GLA/SWA model's SWA
    ring holds window + 1 slots at any context; full attention holds the context plus the decoded tokens.

    Args:
        contexts: tokens already in the cache.
        batches: sequences decoded together.
        models: presets of model.py.
        steps: decode steps a timed window (on CUDA the median of WINDOWS windows, after 3 warm-up steps and
            WARM_S seconds of steps, each window printed).
        compile: torch.compile the step with CUDA graphs, as generate.py --compile (compiles once per model
            and batch shape; the first compile takes minutes).
        gemv: with compile, batch-1 matmuls as inductor's tuned reductions (kernels.compile_decode); false: cuBLAS.
        gla: kernels.GLA_IMPL ("auto": Triton kernels on CUDA; "torch": the PyTorch path).
        n_layer: keep n layers of every model (first_layers), e.g. the 76B at real widths on one GPU:
            --models '[spikingbrain-76b,qwen2.5-7b]' --n_layer 4.
        quant: every model's projections as `quantize` makes them: bf16 (as they are), int8 (weight-only INT8, as
            generate.py --quant int8: on CUDA kernels.int8_gemv up to 8 rows a step) or w8aspike (spike counts x
            INT8 weights, as convert.py w8aspike: on CUDA kernels.spike_linear) or fp8 (spike counts x e4m3
            weights, as generate.py --quant fp8: on CUDA kernels.fp8_gemv up to 8 rows a step, no host sync, so
            --compile keeps it in the graph). The header names the route (decode_route).
        gemv_half: w8aspike and fp8 decode GEMVs take the spike-count rows in fp16 where they fit
            (kernels.SPIKE_GEMV_HALF); false: tf32 (the other half of an A/B).
        gemv8: with compile, the 8-bit GEMVs (int8, w8aspike, fp8) as inductor's reductions of kernels.gemv8_fused,
            or the Triton gemv8 op; None: kernels.GEMV8_COMPILED's choice per weight format.
        inductor: with compile, more of inductor's options for the step (kernels.compile_decode), e.g.
            '{"realize_reads_threshold": 0}': an input that several projections read is written once, not
            recomputed inside each one's reduction (an A/B).
        realize_inputs: with compile, every projection's input through kernels.realized (written once, read as it
            is by the projection's reduction: not its producer recomputed per output row): the other half of an A/B.
        gemv_row: the 8-bit GEMVs of one row (batch 1) on kernels.gemv_row (one launch a projection, CUDA cores);
            false: the gemv8 op or gemv8_fused as for more rows (the other half of an A/B).
        row_configs: settings of kernels.gemv_row for this device in place of GEMV_ROW_CONFIGS' entries, keyed
            "<int8|w8aspike|e4m3|float> <wide|tall>", e.g. '{"int8 wide": {"BN": 32, "BK": 128, "num_warps": 8,
            "num_stages": 3}}' (an A/B of a swept setting; "DOT": true multiplies W8ASpike's or FP8's counts on
            the tensor cores); null: that shape takes the gemv8 op.
        split_bias: with compile, a bf16 projection with a bias at batch 1 as a bias-free GEMV + the bias
            (kernels.use_split_bias: inductor's tuned reduction); false: F.linear with the bias (cuBLAS's addmm).
        cse: with compile, a spiking or 8-bit step's common subexpressions merged (kernels.decode_cse: one
            spike-count pass per input that several projections read), as compile_decode does; false (with
            --group_rows false): not merged (the other half of an A/B; with --realize_gemv false too, no pass
            at all: as inductor compiles it).
        group_rows: with compile, cse and then the one-row 8-bit GEMVs of one input in one launch each
            (kernels.group_row_products: q, k, v; gate, up), as compile_decode does; false: cse alone.
        row_spikes: a spiking layer's one-row GEMV makes its input's spike counts in the kernel
            (kernels.GEMV_ROW_SPIKES: every program reads the row once more for vth); false: a pass over the input
            makes them first (compiled: fused into the input's producer), the faster (BENCHMARKS.md).
        row_counts: the spike counts before a one-row GEMV from kernels.spike_counts (one program a row,
            kernels.ROW_COUNTS); false: compiled with the pass that makes the input, the faster (BENCHMARKS.md).
        row_persistent: with compile, the step's reductions over a few rows (norms, spike counts) persistent up to
            this width (kernels.ROW_PERSISTENT); 0, the default: inductor's rule (BENCHMARKS.md).
        realize_gemv: with compile, a projection's input made by a transcendental op (SwiGLU's silu(gate) * up)
            written once before its GEMV (kernels.realize_gemv_inputs, compile_decode's default); false: inductor
            recomputes it inside the GEMV's reduction (the other half of an A/B).
        realize_norms: with realize_gemv, an RMSNorm's output that a projection reads written once too (the norm
            its own kernel; kernels.REALIZE_GEMV_NORMS); false: recomputed in every program of the GEMVs that read
            it (the other half of an A/B).
        device: cuda or cpu.
        tiny: CPU smoke run: tiny models, short contexts.
    """
    check_quant(quant)
    kernels.ROW_PERSISTENT = row_persistent
    kernels.SPIKE_GEMV_HALF = gemv_half
    kernels.GEMV_ROW_MAX_ROWS = 1 if gemv_row else 0
    kernels.GEMV_SPLIT_BIAS = split_bias
    kernels.GEMV_ROW_SPIKES = row_spikes
    kernels.ROW_COUNTS = row_counts
    if gemv8:
        kernels.GEMV8_COMPILED = dict.fromkeys(kernels.GEMV8_COMPILED, gemv8)
    if tiny:
        contexts, batches, models, steps, device = (64, 256), (1, 2), ("tiny", "tiny-qwen"), 8, "cpu"
    cuda, dt, mem = setup(device, gla)
    bw, fmt = device_rate(device, "copy"), "fp8" if quant == "fp8" else "int8"
    cap = torch.cuda.get_device_capability(device) if cuda else "cpu"
    if row_configs:
        kernels.GEMV_ROW_CONFIGS = {**kernels.GEMV_ROW_CONFIGS, cap: {**kernels.GEMV_ROW_CONFIGS.get(cap, {}), **{
            tuple(key.split()): cfg and dict(cfg) for key, cfg in row_configs.items()}}}
    row_cfg = kernels.GEMV_ROW_CONFIGS.get(cap, "safe")
    warm, warm_s, more, windows = 3, WARM_S if cuda else 0.0, WARM_MAX if cuda else 0, WINDOWS if cuda else 1
    header(device, dt, gla, f"{compile} (gemv {gemv}{', options ' + str(inductor) if inductor else ''}"
           f"{', inputs realized' if realize_inputs else ''}{'' if split_bias else ', bias in the matmul'}"
           f"{', common subexpressions merged' if (cse or group_rows) and quant != 'bf16' else ''}"
           f"{', one-row GEMVs of one input grouped' if group_rows and quant != 'bf16' else ''}"
           f"{f', row reductions persistent to {row_persistent}' if row_persistent else ''}"
           f"{'' if realize_gemv else ', transcendental GEMV inputs inlined'}"
           f"{', norm outputs realized' if realize_gemv and realize_norms else ''})"
           if compile else compile,
           f"quant {quant}{'' if gemv_half else ' (count rows in tf32)'}; projections at batch {batches[0]}: "
           f"{decode_route(quant, device, batches[0])}"
           f"{'' if not compile or quant == 'bf16' else ', compiled as ' + kernels.GEMV8_COMPILED[fmt]}"
           f"{f'; one row: kernels.gemv_row {row_cfg}' if quant != 'bf16' and kernels.GEMV_ROW_MAX_ROWS else ''}"
           f"{', counts in the kernel' if quant in ('fp8', 'w8aspike') and row_spikes and gemv_row else ''}"
           f"{', counts by kernels.spike_counts' if quant in ('fp8', 'w8aspike') and row_counts else ''}; "
           f"device copy {bw / 1e12:.3g} TB/s (read + write); context filled synthetically; "
           f"{f'median of {windows} windows of ' if windows > 1 else ''}{steps} steps"
           f"{f' after {warm_s:g} s of warm-up steps' if warm_s else ''}; "
           f"layers {n_layer or 'all'}")
    print("\n".join(describe(name, n_layer) for name in models))
    print(f"{'model':>16} {'B':>3} {'context':>8} {'tok/s/seq':>10} {'tok/s':>8} {'bound/seq':>10} {'%bound':>7} "
          f"{'cache GiB':>10} {'peak GiB':>9}", flush=True)
    for name in models:
        m = quantize(random_model(name, device, dt, n_layer), quant)
        c, resident = m.config, weight_bytes(m)
        print(f"{name:>16} {quant}: {weight_bytes_read(m, 1) / 2**30:.3g} GiB of weights read per batch-1 step",
              flush=True)
        step = m.forward
        if compile:
            torch._dynamo.reset()            # a fresh compile per model: recompiles stay under dynamo's limit
            if realize_inputs:
                for mod in m.modules():
                    if isinstance(mod, torch.nn.Linear):
                        mod.register_forward_pre_hook(lambda mod, args: (kernels.realized(args[0]),))
            opts = {**(inductor or {}), "post_grad_custom_pre_pass": kernels.decode_cse(
                group_rows, cse=cse or group_rows, realize=realize_gemv, norms=realize_norms)}
            step = kernels.compile_decode(m.forward, torch.device(device), gemv, opts)
        speed = {}
        for B in batches:
            for ctx in contexts:
                max_len = c.max_seq_len if linear_time(c) else ctx + warm + more + windows * steps
                cb, weights = m.new_cache(B, max_len, device="meta").nbytes(), weight_bytes_read(m, B)
                if resident + cb > 0.92 * mem:
                    print(f"{name:>16} {B:>3} {ctx:>8} skipped: weights + cache need {(resident + cb) / 2**30:.0f} "
                          "GiB", flush=True)
                    continue
                tok = torch.randint(0, c.vocab_size, (B, 1), device=device)
                try:
                    t, t_warm, peak, per = time_decode(step, synthetic_cache(m, B, ctx, max_len), tok, warm, steps,
                                                       compile, warm_s, windows)
                except torch.OutOfMemoryError:
                    gc.collect()
                    torch.cuda.empty_cache()
                    print(f"{name:>16} {B:>3} {ctx:>8} out of memory", flush=True)
                    continue
                bound = bw / (weights + cb)                          # steps/s if every byte is read once
                speed[B, ctx] = 1 / t
                print(f"{name:>16} {B:>3} {ctx:>8} {1 / t:10.1f} {B / t:8.1f} {bound:10.1f} {100 / t / bound:6.0f}% "
                      f"{cb / 2**30:10.2f} {peak / 2**30:9.1f}" +
                      (f"  (warm-up and compile {t_warm:.0f} s)" if compile else "") +
                      (f"  windows {' / '.join(f'{1 / w:.1f}' for w in per)}" if windows > 1 else ""), flush=True)
        for B in batches:
            have = [ctx for ctx in contexts if (B, ctx) in speed]
            if len(have) >= 2:
                lo, hi = have[0], have[-1]
                print(f"{name:>16} {B:>3} flatness: tok/s at {hi} / at {lo} = {speed[B, hi] / speed[B, lo]:.2f}",
                      flush=True)
        del m, step


# the tl.dot settings near the best of a wider sweep on an H200 (benchmarks/LOG.md, 2026-12-01), then the CUDA-core
# path's best there (it read at most ~60% of tl.dot's rate on the large projections)
GEMV_SWEEP = ([dict(BN=bn, BK=bk, num_warps=4, num_stages=st)
               for bn, bk in ((32, 128), (64, 128), (128, 128), (128, 64)) for st in (3, 4)] +
              [dict(BN=bn, BK=256, num_warps=w, num_stages=st, DOT=False) for bn in (16, 32) for w in (2, 4)
               for st in (2, 4)])


# kernels._gemv_row_kernel's settings timed by bench.py gemv (one row, CUDA cores); BN is the most a program takes
# (halved on small matrices), BK within a group for int8; ACC2D False: each tile reduced; MAGIC False: int8 by the
# conversion instruction; DOT: spike counts times int8 or e4m3 weights on the tensor cores (w8aspike and fp8 only);
# SPLIT: programs a block of channels splits K among (more, wider blocks on the tall shapes)
GEMV_ROW_SWEEP = ([dict(BN=bn, BK=128, num_warps=w, num_stages=st, ACC2D=a) for bn, w, st in
                   ((8, 4, 3), (16, 4, 3), (32, 8, 3), (16, 8, 4), (64, 8, 3)) for a in (True, False)] +
                  [dict(BN=bn, BK=bk, num_warps=w, num_stages=st, ACC2D=a) for bn, bk, w, st in
                   ((4, 512, 4, 3), (16, 256, 4, 3)) for a in (True, False)] +
                  [dict(BN=bn, BK=128, num_warps=w, num_stages=3, MAGIC=False) for bn, w in ((16, 4), (32, 8))] +
                  [dict(BN=bn, BK=bk, num_warps=w, num_stages=st, DOT=True) for bn, bk, w, st in
                   ((16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (64, 128, 4, 5), (64, 256, 4, 4),
                    (128, 128, 8, 4), (128, 256, 8, 3))] +
                  [dict(BN=bn, BK=bk, num_warps=w, num_stages=3, ACC2D=a, SPLIT=sp) for bn, bk, w, a, sp in
                   ((16, 256, 4, False, 4), (16, 256, 4, False, 8), (8, 512, 4, True, 4), (32, 256, 8, False, 8),
                    (16, 512, 4, False, 4))])


def graph_us(fn, device):
    """Device microseconds of one call of fn: median of triton's CUDA-graph timing (launch overhead excluded, as in
    a compiled decode step); on a CPU, ms()."""
    if torch.device(device).type != "cuda":
        return 1e3 * ms(fn, device)
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def bench_gemv(*, preset: str = "spikingbrain-7b", rows: int = 1, k: float = 3.0, sweep: bool = True,
               row_sweep: bool = True, row_settings: list[dict] | None = None, device: str = "cuda",
               tiny: bool = False) -> None:
    """Decode GEMVs (a batch-1 step's projections) at the preset's shapes, each route timed alone under a CUDA
    graph, its weight bytes read per microsecond beside the device copy rate: bf16 F.linear compiled as a decode
    step compiles it (inductor's tuned reduction, kernels.compile_decode without graphs), the gemv8 op as the 8-bit
    layers call it (int8 in groups of 128 from bf16 rows: weight-only; the spike counts' two rows of W8ASpike (int8
    groups) and FP8 (e4m3, one scale a row)) under its current settings and, with sweep, under every GEMV_SWEEP
    setting (tl.dot on rows padded to 16, or DOT false: CUDA-core products; projections of 1M weights or more),
    and gemv8_fused compiled; for one row also kernels.gemv_row (one launch on the CUDA cores: int8 weight-only, the
    W8ASpike and FP8 counts with vth, FP8's counts also as fp16 ("fp8-x16": they are e4m3 values, so exact; half
    the bytes of the row a program reads), bf16 weights as "bf16-row") as set and, with row_sweep, under every
    GEMV_ROW_SWEEP setting. Each route takes its turn over copies of its weights that together pass twice the
    L2 cache, so each call reads its weights from memory as a decode step does. Then a block's projections summed
    per route (the best setting per shape where swept): the 8-bit routes' time over bf16's is what the weight reads
    alone allow a decode step. Accuracy: tests/test_kernels.py.

    Args:
        preset: model.py preset whose first block's projection shapes are timed.
        rows: tokens a step (batch x new tokens, at most 8).
        k: spike threshold parameter of the count rows.
        sweep: time every GEMV_SWEEP setting too (a setting that does not compile is skipped).
        row_sweep: time every GEMV_ROW_SWEEP setting of the one-row kernel (kernels.gemv_row) too.
        row_settings: the one-row kernel's settings to sweep in place of GEMV_ROW_SWEEP, e.g.
            '[{"BN": 8, "BK": 1024, "num_warps": 8, "num_stages": 3}]'.
        device: cuda or cpu.
        tiny: CPU smoke run (TRITON_INTERPRET=1): the tiny preset, two settings (the counts' routes a third, on
            the tensor cores).
    """
    check_spike_k(k, "k")
    if not 1 <= rows <= 8:
        raise ValueError(f"rows={rows}: decode GEMVs take 1 to 8 rows")
    settings = GEMV_SWEEP if sweep else []
    if tiny:
        preset, device, settings = "tiny", "cpu", [GEMV_SWEEP[0], GEMV_SWEEP[-1]][:2 if sweep else 0]
    cuda, dt = device.startswith("cuda"), torch.bfloat16 if device.startswith("cuda") else torch.float32
    bw = device_rate(device, "copy") / 2    # bytes read per second (the copy reads and writes each byte)
    header(device, dt, "-", "decode (inductor, coordinate descent)", f"{preset} projections, {rows} row(s), "
           f"spike k={k}; device copy reads {bw / 1e12:.3g} TB/s; triton {triton.__version__}; "
           f"{len(settings)} gemv8 settings swept; one-row kernel (kernels.gemv_row) {kernels.GEMV_ROW_CONFIGS}"
           f"{f', {len(GEMV_ROW_SWEEP)} of its settings swept' if row_sweep and rows == 1 else ''}" +
           ("" if cuda or kernels.INTERPRET else "; the gemv8 op left out (Triton needs CUDA or TRITON_INTERPRET=1)"))
    shapes = block_projections(preset)
    print(f"{'projections':>22} {'K':>6} {'N':>6} {'route':>10} {'setting':>44} {'us':>8} {'TB/s':>6} {'of copy':>7}",
          flush=True)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if cuda else 0
    if cuda:
        kernels.row_tickets(torch.device(device))   # SPLIT settings take them (made once, before any CUDA graph)
    opts = {"coordinate_descent_tuning": True} if cuda else None
    torch.manual_seed(0)
    total = {}
    for (K, N), names in shapes.items():
        # compiled afresh per shape, static shapes: a decode step's projections are compiled at their own shapes, and
        # one compiled function over every shape would pass dynamo's recompile limit and run uncompiled
        torch._dynamo.reset()
        lin = torch.compile(lambda x, w: F.linear(x, w), options=opts, dynamic=False) if cuda else F.linear
        fused = torch.compile(kernels.gemv8_fused, options=opts, dynamic=False) if cuda else kernels.gemv8_fused
        n = max(1, min(64, -(-2 * l2 // (N * K))))   # weight copies past twice the L2, taken in turn: each call reads
        x = torch.randn(rows, K, device=device, dtype=dt)   # its weights from memory, as in a decode step
        ws = [torch.randn(N, K, device=device) * K ** -0.5 for _ in range(n)]
        wb = [w.to(dt) for w in ws]
        q8 = [spiking.quantize_weight(w, 128) for w in ws]
        f8 = [(bits, s.view(N, 1)) for bits, s in map(spiking.quantize_weight_fp8, ws)]
        del ws
        turn = itertools.count()

        def pick(copies):
            return copies[next(turn) % n]
        counts = kernels.spike_count_rows_torch(x, k)[0]
        half = kernels.spike_gemv_fits(x, k) and K * k < kernels.FP16_MAX   # the count rows in fp16, as the layers
        routes = {"bf16": ("bf16", lambda: lin(x, pick(wb)), wb[0].nbytes)}
        swept = settings if N * K >= 2 ** 20 or tiny else []   # not the gk projections' few KB: they matter little
        for r, a, copies, is8 in (("int8", x, q8, False), ("w8aspike", counts, q8, False), ("fp8", counts, f8, True)):
            gs, rows_half = (K if is8 else 128), half and r != "int8"
            nbytes = sum(t.nbytes for t in copies[0])
            fmt = kernels._fp8_gemv_format(torch.device(device)) if is8 else 0   # as the op picks it
            for cfg in [None] + swept if cuda or kernels.INTERPRET else []:
                def run(a=a, copies=copies, is8=is8, gs=gs, rows_half=rows_half, fmt=fmt, cfg=cfg, r=r):
                    wq, st = pick(copies)
                    if cfg is None:   # as the layers call it
                        return kernels._gemv8_op(a, wq, st, gs, None, is8, r != "int8", rows_half)
                    xs = a.half() if rows_half else a.float() if r != "int8" else a
                    return kernels._gemv8(xs, wq, st, xs.new_empty(xs.shape[0], N, dtype=torch.float32), min(gs, K),
                                          None, cfg, fmt, "tf32" if cuda and r != "int8" else None)
                name = "op (as set)" if cfg is None else ", ".join(f"{key}={v}" for key, v in cfg.items())
                routes[f"{r} {name}"] = (r, run, nbytes)
            routes[f"{r} gemv8_fused"] = (r, lambda a=a, copies=copies, gs=gs, is8=is8: fused(a, *pick(copies), gs,
                                                                                                is8), nbytes)
        # the one-row kernel (kernels.gemv_row), for rows=1: int8 weight-only on the bf16 row, W8ASpike and FP8 on
        # the counts (fp32, e4m3-rounded for FP8) with vth applied in the kernel, bf16 weights too (W_FLOAT)
        c1, v1 = kernels.gemv_counts_torch(x, k)
        c8, v8 = kernels.gemv_counts_torch(x, k, fp8=True)
        fmt8 = kernels.W_E4M3 if kernels._fp8_gemv_format(torch.device(device)) == 1 else kernels.W_E4M3_BITS
        for r, a, v, copies, gs, fmt, tag in (
                ("int8", x, None, q8, 128, kernels.W_INT8, "row"),
                ("w8aspike", c1, v1, q8, 128, kernels.W_INT8, "row"),
                ("fp8", c8, v8, f8, K, fmt8, "row"), ("fp8-x16", c8.half(), v8, f8, K, fmt8, "row"),
                ("fp8", c8, v8, f8, K, kernels.W_E4M3_BITS, "row" if fmt8 == kernels.W_E4M3_BITS else "row bits"),
                ("bf16-row", x, None, [(w, None) for w in wb], K, kernels.W_FLOAT, "row")):
            if rows != 1 or not (cuda or kernels.INTERPRET):
                break
            nbytes = sum(t.nbytes for t in copies[0] if t is not None)
            counts = r in ("w8aspike", "fp8", "fp8-x16") and tag == "row"   # the routes DOT settings take
            row_swept = [c for c in (row_settings or GEMV_ROW_SWEEP) if not c.get("DOT") or counts] \
                if row_sweep and (N * K >= 2 ** 20 or tiny) else []
            if tiny:   # two settings, and one on the tensor cores where the route takes it
                row_swept = row_swept[:2] + [c for c in row_swept if c.get("DOT")][:1]
            for cfg in ([None] if tag != "row bits" else []) + row_swept:
                def run(a=a, v=v, copies=copies, gs=gs, fmt=fmt, cfg=cfg):
                    wq, st = pick(copies)
                    if cfg is None:
                        return kernels.gemv_row(a, wq, st, gs, fmt, v, None, dt)
                    return kernels._gemv_row(a, [wq], [st], v, [None], [a.new_empty(1, N, dtype=dt)], gs, fmt, cfg)
                name = "(as set)" if cfg is None else ", ".join(f"{key}={val}" for key, val in cfg.items())
                routes[f"{r} {tag} {name}"] = (r, run, nbytes)
        best = {}
        for label, (r, fn, nbytes) in routes.items():
            try:
                with torch.no_grad():
                    if cuda:   # compiled and tuned before the graph's capture (a CPU run's one call does it all)
                        fn()
                    t = graph_us(fn, device)
            except Exception as e:   # a swept setting that does not compile on this device
                if label.endswith(("(as set)", "gemv8_fused")) or label == "bf16":
                    raise
                print(f"{','.join(names):>22} {K:>6} {N:>6} {r:>10} {label[len(r) + 1:]:>44} does not run here: "
                      f"{type(e).__name__}", flush=True)
                continue
            print(f"{','.join(names):>22} {K:>6} {N:>6} {r:>10} {label[len(r) + 1:] or '-':>44} {t:8.1f} "
                  f"{nbytes / t / 1e6:6.2f} {nbytes / t / 1e6 / (bw / 1e12):6.0%}", flush=True)
            for key in {r, label}:
                if key not in best or t < best[key][0]:
                    best[key] = (t, label)
        for key, (t, label) in best.items():
            total.setdefault(key, [0.0, set()])
            total[key][0] += t * len(names)
            total[key][1].add(label)
    print("block's projections summed (best setting per shape for int8, w8aspike, fp8):")
    for key in ("bf16", "int8", "w8aspike", "fp8", "fp8-x16",
                *(f"{r} op (as set)" for r in ("int8", "w8aspike", "fp8")),
                *(f"{r} gemv8_fused" for r in ("int8", "w8aspike", "fp8")),
                "bf16-row", *(f"{r} row (as set)" for r in ("bf16-row", "int8", "w8aspike", "fp8", "fp8-x16"))):
        if key in total:
            t = total[key][0]
            swept = key in ("int8", "w8aspike", "fp8", "fp8-x16", "bf16-row")
            print(f"{key:>24} {t:9.1f} us  {total['bf16'][0] / t:5.2f}x bf16" +
                  (f"  ({'; '.join(sorted(total[key][1]))})" if swept else ""), flush=True)


# ----------------------------------------------------------------------------- serving

def ascii_tokenizer(d):
    """A tokenizer in d of the 128 ASCII characters (no merges) + the ChatML specials: a prompt of L letters is L
    tokens, and every token the model picks is whole text (no byte of a character held back for the next), so the
    server streams one chunk per token and a client can time each token."""
    tokenizer.save(d, {bytes([i]): i for i in range(128)}, {s: 128 + i for i, s in enumerate(tokenizer.CHAT_SPECIALS)})


def random_checkpoint(preset, d, device, dt):
    """A random-weight checkpoint of preset in d/ckpt, written by convert.save_checkpoint with ascii_tokenizer: what
    serve.py loads. The model is made on `device` (a 7B initializes in seconds there) and freed before a server
    needs the memory. Returns the bytes written."""
    ascii_tokenizer(os.path.join(d, "tokenizer"))
    m = random_model(preset, device, dt)
    convert.save_checkpoint(m, m.config, os.path.join(d, "ckpt"), os.path.join(d, "tokenizer"))
    del m
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return sum(f.stat().st_size for f in os.scandir(os.path.join(d, "ckpt")))


def gpu_memory_of(pgid):
    """Device bytes held by the processes of group pgid (a server's), by nvidia-smi; None off CUDA, without
    nvidia-smi, or where it reports no process of the group (another PID namespace)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    held = None
    for line in out.splitlines():
        try:
            pid, mib = (int(x) for x in line.split(","))
            if os.getpgid(pid) == pgid:
                held = (held or 0) + mib * 2**20
        except (ValueError, OSError):   # a line that is no process, or one gone meanwhile
            continue
    return held


def start_server(ckpt, log, **flags):
    """`python serve.py --ckpt ckpt --FLAG VALUE ...` on 127.0.0.1 at a free port, as a user starts it, in a process
    group of its own (stop_server ends every LitServe process in it), its output into the file `log`. Returns
    (process, base URL, log) at once: wait_server waits for it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "serve.py"), "--ckpt", ckpt, "--host", "127.0.0.1",
                                 "--port", str(port), *args], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/v1", log


def wait_server(proc, url, log, wait_s, name="serve.py", every=15.0):
    """Until the server's /health answers; an error with its log's end if it exits or takes over wait_s seconds. Its
    warm-up lines (serve.py --compile: "warm-up: ...", a stage each) are printed as they come and, when none has come
    for `every` seconds, a line saying how long it has been: a start of minutes shows. Returns (seconds until it
    answered, the warm-up's seconds or None)."""
    t0 = time.monotonic()
    deadline, said, read, warm = t0 + wait_s, t0, 0, None

    def show():   # the log's new whole lines; True when one was printed
        nonlocal read, warm
        with open(log, "rb") as f:
            f.seek(read)
            new = f.read()
        new = new[:new.rfind(b"\n") + 1]
        read += len(new)
        lines = [line for line in new.decode(errors="replace").splitlines() if line.startswith("warm-up: ")]
        for line in lines:
            print(f"{name:>16} {line}", flush=True)
            if line.startswith("warm-up: done in "):
                warm = float(line.split()[3])
        return bool(lines)
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as r:
                if r.status == 200:
                    show()
                    return time.monotonic() - t0, warm
        except OSError:   # not listening yet, or 503 while the worker loads the checkpoint
            pass
        if show():
            said = time.monotonic()
        elif time.monotonic() - said >= every:
            print(f"{name:>16} waiting for serve.py: {time.monotonic() - t0:.0f} s", flush=True)
            said = time.monotonic()
        time.sleep(0.5)
    why = f"exit status {proc.returncode}" if proc.poll() is not None else f"no answer in {wait_s:.0f} s"
    with open(log) as f:
        raise RuntimeError(f"serve.py did not come up ({why}):\n{f.read()[-3000:]}")


def stop_server(proc):
    """SIGTERM, as a process manager stops serve.py (it ends LitServe's processes and exits); then SIGKILL to whatever
    is left of its process group, so that the next server finds the GPU's memory free."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:   # nothing left
        pass
    proc.wait(60)


def random_prompt(n, seed):
    """n random lowercase letters and spaces: n tokens under ascii_tokenizer."""
    return "".join(random.Random(seed).choices(string.ascii_lowercase + " ", k=n))


def stream_completion(url, model, prompt, max_tokens, timeout_s):
    """One streamed /v1/completions request through the `openai` client, greedy, stop tokens ignored (the reply runs
    to max_tokens). Returns the perf_counter time it was sent (start) and each chunk's arrival (times: one per token
    under ascii_tokenizer), the server's counts (usage) and the finish_reason."""
    import openai   # the serve extra's, as serve.py's clients use it; bench's other commands do without
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=timeout_s)
    times, usage, finish, start = [], None, None, time.perf_counter()
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body=dict(ignore_eos=True)):
        times.append(time.perf_counter())
        usage, finish = chunk.usage or usage, chunk.choices[0].finish_reason or finish
    return dict(start=start, times=times, tokens=usage.completion_tokens, prompt_tokens=usage.prompt_tokens,
                finish=finish)


def serve_clients(url, model, prompts, max_tokens, timeout_s):
    """stream_completion of every prompt at once, each from its own thread, released together: a list of their
    results in prompt order."""
    out, errors, go = [None] * len(prompts), [], threading.Barrier(len(prompts))

    def client(i):
        try:
            go.wait(timeout_s)
            out[i] = stream_completion(url, model, prompts[i], max_tokens, timeout_s)
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    if any(r is None for r in out):
        raise TimeoutError(f"{sum(r is None for r in out)} of {len(prompts)} clients had no reply in {timeout_s:.0f} s")
    return out


def serve_figures(res):
    """TTFT median and p90 (nearest rank), aggregate decode tok/s and wall seconds (first request sent to last token)
    of one serve_clients run. Aggregate decode: the tokens all clients received while every one of them was decoding
    (after the last client's first token, up to the first client's last token) over that span; with one client,
    (tokens - 1) / (last - first token). Not the tokens over the whole run: requests that reach the worker a step
    apart are prefilled in different steps (the rows decoding wait meanwhile), and that would count prefills as
    decoding. NaN when no such span exists."""
    ttft = sorted(r["times"][0] - r["start"] for r in res)
    a, b = max(r["times"][0] for r in res), min(r["times"][-1] for r in res)
    n = sum(a < t <= b for r in res for t in r["times"])
    return dict(ttft_p50=statistics.median(ttft), ttft_p90=ttft[math.ceil(0.9 * len(ttft)) - 1],
                decode=n / (b - a) if b > a else math.nan,
                wall=max(r["times"][-1] for r in res) - min(r["start"] for r in res))


def row_bytes(c, n, dt):
    """Bytes of one serve.py row (a batch-1 generation cache) holding n tokens: the memory a conversation of n tokens
    takes in the server (its GLA states and SWA ring have one size past the window; full attention grows with n)."""
    return Cache(c, 1, n, device="meta", dtype=dt).nbytes()


def bench_serve(*, models: tuple[str, ...] = ("spikingbrain-7b", "qwen2.5-7b"),
                lengths: tuple[int, ...] = (1024, 32768), clients: tuple[int, ...] = (1, 8, 32), max_tokens: int = 32,
                compile: bool = False, device: str = "cuda", wait_s: float = 900.0, tiny: bool = False) -> list[dict]:
    """serve.py as users run it, driven by concurrent streaming clients: time to first token, aggregate decode
    tokens/s, and memory per conversation, for each model at each prompt length and number of clients.

    Per model: a random-weight checkpoint (bf16 on GPU; ascii_tokenizer: a prompt of L random letters is L tokens,
    each token one streamed chunk) is written by convert.save_checkpoint to a temporary directory ($TMPDIR; ~15 GB
    for a 7B, deleted once loaded), and `python serve.py` serves it on 127.0.0.1 (a subprocess with its own LitServe
    processes) with max(clients) rows of max(lengths) + max_tokens tokens. Servers that fit in the device's memory
    together start and warm up together (one request per length: kernels compile on first use), then are measured
    one at a time, each stopped after its runs. For each length and client count, that many clients (threads, the
    `openai` client) each stream a completion of a different random prompt, greedy, max_tokens tokens (ignore_eos:
    exact lengths). Per run: TTFT median and p90 (from sending to the first token), aggregate decode tok/s
    (serve_figures: tokens per second while all the run's clients are decoding), wall seconds from the first request
    to the last token, memory per conversation (row_bytes: Cache.nbytes of one row holding prompt + max_tokens
    tokens; the server holds max(clients) rows of its max_len) and the server's device memory after the run
    (nvidia-smi, its processes: weights, every row, CUDA contexts and what PyTorch's allocator keeps). Then aggregate
    at max(clients) / at min(clients), and row sizes at longer contexts.

    The server decodes all its rows every step, busy or not (one shape, one compiled graph), so one client is decoded
    at the cost of max(clients) rows: the single-stream figure is this server's, not a max_batch=1 server's.

    Args:
        models: presets of model.py.
        lengths: prompt lengths in tokens.
        clients: concurrent clients per run (the server gets max(clients) rows).
        max_tokens: tokens each client asks for (>= 2).
        compile: serve.py --compile true (its start then compiles prefill and decode: minutes per model; its
            warm-up lines are shown while it starts, and their total as `warm-up s`).
        device: cuda (cuda:N) or cpu.
        wait_s: longest wait for a server to start, and for one run's replies.
        tiny: CPU smoke run: tiny models, short prompts, clients 1 and 2.
    Returns one dict per run (the figures above and each client's stream_completion result) for tests.
    """
    if tiny:
        models, lengths, clients, max_tokens, device, wait_s = ("tiny", "tiny-qwen"), (12, 100), (1, 2), 8, "cpu", 300
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens}: need 2 or more to time decoding")
    convert.check_device(device)
    cuda = device.startswith("cuda")
    dt = torch.bfloat16 if cuda else torch.float32
    mem = torch.cuda.get_device_properties(device).total_memory if cuda else math.inf
    rows, max_len, t_start = max(clients), max(lengths) + max_tokens, time.perf_counter()
    header(device, dt, "-", compile, f"serve.py, {rows} rows of {max_len} tokens; clients {list(clients)}; prompts of "
           f"{list(lengths)} tokens; {max_tokens} tokens each, greedy, ignore_eos")
    configs = {name: Config.from_name(name) for name in models}

    def need(name):   # weights, every row, and the batch-1 cache a prefill fills
        with torch.device("meta"):
            n = GPT(configs[name]).num_params()
        return n * dt.itemsize + (rows + 1) * row_bytes(configs[name], max_len, dt)
    # servers that fit together run together (their starts and warm-ups overlap), a fifth of the device left for
    # activations, the allocator's cache and the next checkpoint's model while it is made
    groups = [[]]
    for name in models:
        if groups[-1] and sum(map(need, groups[-1] + [name])) > 0.8 * mem:
            groups.append([])
        groups[-1].append(name)
    out, agg = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for group in groups:
            servers = {}
            try:
                t0 = time.perf_counter()
                for name in group:   # a server starts (in the background) as soon as its checkpoint is written
                    t1, d = time.perf_counter(), os.path.join(tmp, name)
                    size = random_checkpoint(name, d, device, dt)
                    print(f"{name:>16} checkpoint {size / 2**30:.1f} GiB written in {time.perf_counter() - t1:.0f} s; "
                          f"rows of {max_len} tokens {row_bytes(configs[name], max_len, dt) / 2**20:.1f} MiB each",
                          flush=True)
                    servers[name] = start_server(os.path.join(d, "ckpt"), os.path.join(d, "log"), max_batch=rows,
                                                 max_len=max_len, device=device, dtype=str(dt).split(".")[1],
                                                 compile=str(compile).lower())
                warm = {}
                for name in group:
                    up, warm[name] = wait_server(*servers[name], wait_s, name)
                    print(f"{name:>16} serve.py up after a {up:.0f} s wait" +
                          ("" if warm[name] is None else f" (warm-up s: {warm[name]:.0f})"), flush=True)
                    shutil.rmtree(os.path.join(tmp, name, "ckpt"))   # in the server's memory now
                t1 = time.perf_counter()
                with ThreadPoolExecutor(len(group)) as pool:   # each server's kernels compile in its own processes
                    list(pool.map(lambda name: [serve_clients(servers[name][1], name, [random_prompt(L, -1)], 2, wait_s)
                                                for L in lengths], group))
                print(f"{', '.join(group)}: checkpoints written and servers up in {t1 - t0:.0f} s, warmed up in "
                      f"{time.perf_counter() - t1:.0f} s", flush=True)
                print(f"{'model':>16} {'prompt':>7} {'clients':>7} {'TTFT p50':>9} {'TTFT p90':>9} "
                      f"{'decode tok/s':>12} {'per client':>10} {'wall s':>7} {'row MiB':>8} {'server GiB':>10}",
                      flush=True)
                for name in group:
                    proc, url, _ = servers[name]
                    for L in lengths:
                        for n in clients:
                            res = serve_clients(url, name, [random_prompt(L, 1000 * n + i) for i in range(n)],
                                                max_tokens, wait_s)
                            f, held = serve_figures(res), gpu_memory_of(proc.pid)
                            prompt = sorted({r["prompt_tokens"] for r in res})
                            r = dict(model=name, length=L, clients=n, prompt_tokens=prompt[0], server_pid=proc.pid,
                                     row_bytes=row_bytes(configs[name], L + max_tokens, dt), server_bytes=held,
                                     warmup_s=warm[name], results=res, **f)
                            out.append(r)
                            agg[name, L, n] = f["decode"]
                            gib = f"{held / 2**30:10.1f}" if held else f"{'-':>10}"
                            print(f"{name:>16} {'/'.join(map(str, prompt)):>7} {n:>7} {f['ttft_p50']:9.3f} "
                                  f"{f['ttft_p90']:9.3f} {f['decode']:12.1f} {f['decode'] / n:10.1f} "
                                  f"{f['wall']:7.2f} {r['row_bytes'] / 2**20:8.1f} {gib}", flush=True)
                    stop_server(servers.pop(name)[0])   # its memory free for the next group
            finally:
                for proc, _, _ in servers.values():
                    stop_server(proc)
    lo, hi = min(clients), max(clients)
    for name in models:
        for L in lengths:
            ratio = agg[name, L, hi] / agg[name, L, lo]
            print(f"{name:>16} prompt {L}: aggregate decode tok/s at {hi} clients / at {lo} = " +
                  (f"{ratio:.1f}x" if math.isfinite(ratio) else "n/a (no span with all clients decoding)"))
    for name, c in configs.items():
        ctx = sorted({*lengths, *(n for n in (131072, 1048576) if n <= c.max_seq_len)})
        print(f"{name:>16} memory per conversation (row_bytes): " +
              ", ".join(f"{n} tokens {row_bytes(c, n, dt) / 2**20:.1f} MiB" for n in ctx))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return out


# ----------------------------------------------------------------------------- training

def train_speed(preset, T, *, n_layer, micro_batch_size, accum, docs, steps, warmup, full_loss, precision,
                activation_checkpointing, compile, device, cp_group=None):
    """Training tokens/s of the preset's first n_layer layers (None: all) on rows of T tokens: `warmup`, then
    `steps` timed optimizer steps, each of `accum` micro-batches (forward, loss, backward) and AdamW. full_loss:
    the loss over every position and the whole vocabulary (else on the last position only). docs > 1: that many
    equal documents per row, with document masks. cp_group: the rows split over its ranks as train.py
    --context_parallel runs them (each rank its slice, kernels.cp_loss, the gradients summed over the ranks by
    kernels.cp_reduce_grads; full_loss only); tokens/s then counts the whole rows, from every rank together.
    Returns (config, tokens/s, training FLOPs per token, peak memory GB: nan off CUDA; under cp_group the largest
    rank's)."""
    c = first_layers(preset, n_layer)
    dtype = {"bf16-true": torch.bfloat16, "bf16-mixed": torch.float32, "32-true": torch.float32}[precision]
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16-mixed")
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(c).to(dtype)
    if compile:                     # as train.py: compiled blocks inside checkpoint wrappers
        kernels.compile_blocks(model)
    if activation_checkpointing:    # True: every block; a number: the first that many (as train.py)
        kernels.checkpoint_blocks(model, None if activation_checkpointing is True else activation_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    x = torch.randint(0, c.vocab_size, (micro_batch_size, T), generator=torch.Generator().manual_seed(T)).to(device)
    doc = (torch.arange(T, device=device) * docs // T).expand(micro_batch_size, T) if docs > 1 else None
    x, doc = kernels.cp_slice(x, cp_group), kernels.cp_slice(doc, cp_group)   # this rank's slice (None: all)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            t0 = time.perf_counter()
        for _ in range(accum):
            with autocast:
                if full_loss:
                    _, loss, aux = model(x, x, doc_ids=doc, cp_group=cp_group)
                    if cp_group is not None:
                        loss = kernels.cp_loss(loss, x.numel(), cp_group)
                else:
                    logits, _, aux = model(x, doc_ids=doc, last_only=True)
                    loss = F.cross_entropy(logits[:, -1].float(), x[:, -1])
            (loss + c.aux_loss_coef * aux).backward()
        if cp_group is not None:
            kernels.cp_reduce_grads(model, cp_group)
        opt.step()
        opt.zero_grad(set_to_none=True)
    synchronize(device)
    tok_s = steps * accum * micro_batch_size * T / (time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    if cp_group is not None:
        mem = rank_max(mem, device, cp_group)
    return c, tok_s, model.flops_per_token(T), mem / 1e9 if device.type == "cuda" else float("nan")


def train_split_worker(group, device, out, preset, T, kw):
    """One rank of bench_train --cp (kernels.cp_launch): train_speed on rows of T tokens split over the group; rank 0
    saves the result to `out`."""
    r = train_speed(preset, T, full_loss=True, device=torch.device(device), cp_group=group, **kw)
    if dist.get_rank(group) == 0:
        torch.save(r, out)


def bench_train(*, preset: str = "spikingbrain-7b", baseline: str = "qwen2.5-7b", n_layer: int | None = None,
                seq_len: int = 8192, long_seq_lens: tuple[int, ...] = (32768, 131072), micro_batch_size: int = 1,
                accum: int = 1, steps: int = 10, warmup: int = 3, long_steps: int = 3, precision: str = "bf16-true",
                activation_checkpointing: Union[bool, int] = True, compile: bool = False, docs: int = 4,
                peak_flops: float | None = None, device: str = "auto", cp: int = 1) -> list[dict] | None:
    """Training tokens/s and MFU of `preset` vs `baseline` at the same widths and depth, one device, one run.

    At seq_len: full training steps (`accum` micro-batches of forward, loss over the whole vocabulary and backward,
    then AdamW) and the peak memory measured. accum: micro-batches per optimizer step (the 7B recipe on 8 GPUs
    accumulates 64: configs/cpt-7b-8k.yaml); steps and warmup count optimizer steps.
    At long_seq_lens: the throughput ratio only, over long_steps after one warm-up step; there the loss is taken
    on the last position (128k positions x 152k classes of logits alone would need 40 GB, and the output layer
    costs both models the same). precision: "bf16-true" (bf16 weights,
    grads and AdamW state), "bf16-mixed" (fp32 weights, autocast) or "32-true". n_layer: keep the first n layers
    of both layouts (per-layer cost sets MFU; fewer layers fit longer sequences on one GPU). docs: documents
    packed per row, of equal length, with train.py's document masks (attention within a document, the GLA state
    restarting at each; flex_attention on CUDA), as train.py's recipes run; the one-document figure (docs = 1,
    no masks) follows in the same table. activation_checkpointing: every block (true), none, or the first N (as
    train.py). peak_flops: the MFU denominator (default: kernels.peak_flops).
    cp > 1: `preset` only, one row of seq_len tokens split over cp processes (one GPU each, NCCL; gloo on a CPU) as
    train.py --context_parallel trains it, beside one process on rows of seq_len / cp (the same tokens per device):
    tokens/s per device and their ratio (the aim at 256k on 2 GPUs against 128k on one: >= 0.85). Returns its rows.
    On CPU, e.g.: python bench.py train --preset tiny --baseline tiny-qwen --seq_len 256 --long_seq_lens [1024]
    """
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    peak = peak_flops or kernels.peak_flops(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {name} torch {torch.__version__}; {precision}, micro batch "
          f"{micro_batch_size} x {accum} accumulated, {docs} document(s) per row (and 1), activation checkpointing "
          f"{activation_checkpointing}, compile {compile}, "
          f"{warmup} warm-up + {steps} timed steps, peak " +
          (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU)"))
    print("\n".join(describe(p, n_layer) for p in ((preset,) if cp > 1 else (preset, baseline))))
    fixed = dict(n_layer=n_layer, micro_batch_size=micro_batch_size, precision=precision, compile=compile,
                 activation_checkpointing=activation_checkpointing, device=dev)
    if cp > 1:
        return train_split(preset, seq_len, cp, dict(fixed, accum=accum, docs=docs, steps=steps, warmup=warmup), peak)

    def run(p, T, full_loss, steps=steps, warmup=warmup, accum=accum, docs=docs):
        try:
            return train_speed(p, T, full_loss=full_loss, steps=steps, warmup=warmup, accum=accum, docs=docs, **fixed)
        except torch.OutOfMemoryError as e:
            print(f"  {p} at {T}: OOM ({str(e)[:100]})")
            return None
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    print("| model | layers | seq | documents per row | tokens/s | MFU | peak memory GB |")
    print("|---|---|---|---|---|---|---|")
    res = {}
    for d in dict.fromkeys((docs, 1)):   # the recipe's layout first, then one document per row
        for p in (preset, baseline):
            r = res[p, d] = run(p, seq_len, True, docs=d)
            if r:
                c, tok_s, flops, mem = r
                mfu = f"{flops * tok_s / peak:.1%}" if peak else "n/a"
                mem = f"{mem:.1f}" if dev.type == "cuda" else "n/a"
                print(f"| {p} | {c.n_layer} | {seq_len} | {d} | {tok_s:.0f} | {mfu} | {mem} |", flush=True)
    for d in dict.fromkeys((docs, 1)):
        if res[preset, d] and res[baseline, d]:
            print(f"{preset} / {baseline} at {seq_len}, {d} document(s) per row: "
                  f"{res[preset, d][1] / res[baseline, d][1]:.2f}x tokens/s")
    for T in long_seq_lens:
        a, b = (run(p, T, False, long_steps, 1, 1) for p in (preset, baseline))
        speeds = [f"{r[1]:.0f}" if r else "OOM" for r in (a, b)]
        ratio = f"{a[1] / b[1]:.2f}x" if a and b else "n/a"
        print(f"{preset} / {baseline} at {T} (loss on the last position): {speeds[0]} / {speeds[1]} tokens/s = {ratio}",
              flush=True)


def train_split(preset, T, n, fixed, peak):
    """bench_train --cp n: rows of T tokens split over n processes (train_split_worker), then one process on rows of
    T // n on the first device; a row each. Returns the rows."""
    kw = {k: v for k, v in fixed.items() if k != "device"}
    dev = fixed["device"]
    kernels.cp_check_devices(n, dev.type)
    print("| model | layers | seq | devices | documents per row | tokens/s per device | MFU | peak memory GB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for ranks, seq in ((n, T), (1, T // n)):
        if ranks > 1:
            with tempfile.TemporaryDirectory() as d:
                out = os.path.join(d, "r.pt")
                kernels.cp_launch(train_split_worker, n, dev.type, out, preset, seq, kw)
                c, tok_s, flops, mem = torch.load(out, weights_only=False)
        else:
            c, tok_s, flops, mem = train_speed(preset, seq, full_loss=True, **fixed)
        per = tok_s / ranks
        mfu = flops * per / peak if peak else None
        print(f"| {preset} | {c.n_layer} | {seq} | {ranks} | {fixed['docs']} | {per:.0f} | "
              f"{'n/a' if mfu is None else f'{mfu:.1%}'} | {f'{mem:.1f}' if dev.type == 'cuda' else 'n/a'} |",
              flush=True)
        rows.append(dict(seq=seq, ranks=ranks, tok_s_per_device=per, mfu=mfu, peak_gb=mem))
    print(f"{preset}: {T} tokens split over {n} devices / {T // n} on one: "
          f"{rows[0]['tok_s_per_device'] / rows[1]['tok_s_per_device']:.2f}x tokens/s per device "
          f"(aim >= 0.85 at 256k on 2 GPUs)")
    return rows


# ----------------------------------------------------------------------------- softmax attention alone

def flex_option_times(T, window, H, Hkv, D, option_sets):
    """The SWA forward of a later prefill chunk per set of the band's kernel_options, torch's defaults ({}) first.
    Yields (options, ms, relative difference from the defaults' output) or (options, None, the error)."""
    q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, T + window + 1, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    chosen, ref = kernels.FLEX_OPTIONS, None
    try:
        for opts in [{}] + list(option_sets):
            kernels.FLEX_OPTIONS = {**chosen, "band": opts}
            kernels.options_failed.clear()
            torch._dynamo.reset()               # a fresh compile per option set (no recompile limit)
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("error")   # an option set that falls back is a failure here
                    o = kernels.sliding_window_attention(q, k, v, window + 1, 0, window).float()
                    t = do_bench(lambda: kernels.sliding_window_attention(q, k, v, window + 1, 0, window))
            except Exception as e:   # an option this torch or GPU does not take: say so, go on
                yield opts, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            ref = o if ref is None else ref
            yield opts, t, ((o - ref).norm() / ref.norm()).item()
    finally:
        kernels.FLEX_OPTIONS = chosen
        kernels.options_failed.clear()
        torch._dynamo.reset()


def decode_attention_times(B, S, window, H, Hkv, D):
    """Decode attention over (B, S) cache slots (a SWA ring when S <= window + 1, else a full-attention cache),
    replayed from a CUDA graph: (us with the Triton kernel, us with SDPA and a dense mask, K/V bytes)."""
    q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k_pos = torch.arange(S, device="cuda").expand(B, -1).masked_fill(torch.arange(S, device="cuda") >= S * 2 // 3,
                                                                      KVCache.EMPTY)
    q_pos, doc = torch.full((B, 1), S, device="cuda"), torch.zeros(B, S, dtype=torch.long, device="cuda")
    row, w, impl0 = [], (window if S <= window + 1 else None), kernels.ATTN_IMPL
    try:
        for impl in ("auto", "sdpa"):   # in a CUDA graph, as the compiled decode step runs: no launch overhead
            kernels.ATTN_IMPL = impl
            with torch.no_grad():
                attention(q, k, v, q_pos, k_pos, doc[:, :1], doc, w)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    attention(q, k, v, q_pos, k_pos, doc[:, :1], doc, w)
                row.append(do_bench(graph.replay, return_mode="median") * 1e3)
    finally:
        kernels.ATTN_IMPL = impl0
    return row[0], row[1], 2 * k.numel() * 2


def swa_times(T, off, window, H, Hkv, D):
    """sliding_window_attention of T queries after `off` ring keys: (forward ms, forward + backward ms for off = 0
    else None, causal flash SDPA's forward ms over the T queries, the band's scores)."""
    q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, T + off, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scores = H * sum(min(t + off, window) + 1 for t in range(T))       # query t sees min(t + off, W) + 1 keys
    with torch.no_grad():
        t_fwd = do_bench(lambda: kernels.sliding_window_attention(q, k, v, off, 0, window))
        t_causal = do_bench(lambda: F.scaled_dot_product_attention(
            *(x[:, -T:].transpose(1, 2) for x in (q, k, v)), is_causal=True, enable_gqa=True))
    t_fb = None
    if off == 0:
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        do = torch.randn_like(q)
        t_fb = do_bench(lambda: kernels.sliding_window_attention(q, k, v, 0, 0, window).backward(do),
                        grad_to_none=[q, k, v])
    return t_fwd, t_fb, t_causal, scores


def bench_swa(*, T: int = 32768, window: int = 4096, H: int = 28, Hkv: int = 4, D: int = 128,
              kernel_options: list[dict] | None = None, decode: tuple[tuple[int, int], ...] = ((1, 4097), (8, 4097),
                                                                                         (1, 131072))) -> None:
    """Softmax attention alone, bf16. kernels.sliding_window_attention (flex_attention, the band's tiles only,
    with kernels.FLEX_OPTIONS["band"]), forward and forward + backward, without a ring in front (off = 0) and with
    the ring of a later prefill chunk (off = window + 1, forward only), beside causal flash SDPA over the same T
    (more work: T^2/2 scores vs ~T * window); TFLOP/s count the band's 4 * scores * D multiply-adds forward, 2.5x
    that backward. --kernel_options '[{"BLOCK_M": 128, ...}, ...]' first times the prefill chunk's forward once
    per set of flex_attention kernel_options (kernels.flex passes them on Hopper GPUs only), after torch's
    defaults, with the output's difference from theirs (an option that assumes what our mask does not hold, e.g.
    BLOCKS_ARE_CONTIGUOUS, shows there). Then decode attention, one query per row over (B, S) cache slots, a third
    of them empty: the Triton kernel (kernels.ATTN_IMPL "auto") vs SDPA with the dense mask ("sdpa"), mask making
    included, replayed from a CUDA graph as compiled decoding runs, with the K/V bytes read per second.
    Accuracy: tests/test_model.py and tests/test_kernels.py."""
    torch.manual_seed(0)
    header("cuda", torch.bfloat16, "-", True, f"T={T} window={window} H={H} Hkv={Hkv} D={D}; "
           f"flex kernel_options {kernels.FLEX_OPTIONS}")
    for opts, t, diff in flex_option_times(T, window, H, Hkv, D, kernel_options) if kernel_options else ():
        if t is None:
            print(f"SWA kernel_options={opts}: failed: {diff}")
        else:
            print(f"SWA T={T} off={window + 1} kernel_options={opts}: forward {t:.2f} ms "
                  f"({4 * H * T * (window + 1) * D / t / 1e9:.0f} TFLOP/s), relative difference from torch's "
                  f"defaults {diff:.1e}", flush=True)
    for B, S in decode:
        triton_us, sdpa_us, kv_bytes = decode_attention_times(B, S, window, H, Hkv, D)
        print(f"decode attention B={B} S={S}: Triton kernel {triton_us:.1f} us "
              f"({kv_bytes / triton_us / 1e3:.0f} GB/s K/V), SDPA with a dense mask {sdpa_us:.1f} us", flush=True)
    for off in (0, window + 1):
        t_fwd, t_fb, t_causal, scores = swa_times(T, off, window, H, Hkv, D)
        line = f"SWA T={T} off={off}: forward {t_fwd:.2f} ms ({4 * scores * D / t_fwd / 1e9:.0f} TFLOP/s)"
        if t_fb is not None:
            line += f", forward + backward {t_fb:.2f} ms ({14 * scores * D / t_fb / 1e9:.0f} TFLOP/s)"
        print(line + f"; causal flash SDPA over T: forward {t_causal:.2f} ms", flush=True)


# ----------------------------------------------------------------------------- profile

KINDS = (("matmul", ("nvjet", "gemm", "gemv", "cutlass", "xmma", "cublas", "splitk")),
         ("softmax attention", ("flex", "fmha", "sdpa", "flash", "attention")),
         ("GLA kernels", ("_scan_kernel", "_chunk_kernel", "_chunk_state_kernel", "_bwd_dqkg_kernel",
                          "_recurrent_kernel")),
         ("optimizer", ("multi_tensor", "adam")),
         ("spike counts", ("_spike_counts_kernel",)),
         ("compiled (elementwise, reductions)", ("triton_",)))


def kind_of(kernel, kinds=KINDS):
    """The group of a CUDA kernel's name in bench.py profile's totals; "other elementwise / copies" if none."""
    k = kernel.lower()
    return next((name for name, keys in kinds if any(s.lower() in k for s in keys)), "other elementwise / copies")


def profiled(fn, activity, device):
    """torch.profiler over one call of fn, from a synchronized device to a synchronized device."""
    synchronize(device)
    with profile(activities=[activity]) as p:
        fn()
        synchronize(device)
    return p


def device_time_by_kind(p, groups=KINDS):
    """A profile's CUDA kernel time in microseconds summed by kind_of, largest first."""
    kinds = {}
    for e in p.key_averages():
        if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0:
            k = kind_of(e.key, groups)
            kinds[k] = kinds.get(k, 0) + e.self_device_time_total
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def print_profile(p, title, rows, cuda, groups=KINDS):
    """A profiler's top kernels and, on CUDA, their device time summed by kind of kernel."""
    print(f"## {title}")
    print(p.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows,
                                 max_name_column_width=120))
    if not cuda:
        return
    kinds = device_time_by_kind(p, groups)
    total = sum(kinds.values())
    print(f"{'kind':>34} {'ms':>9} {'%':>6}")
    for k, t in kinds.items():
        print(f"{k:>34} {t / 1e3:9.2f} {100 * t / total:5.1f}%")
    print(f"{'total':>34} {total / 1e3:9.2f}")


def bench_profile(*, preset: str = "spikingbrain-7b", n_layer: int = 4, seq_len: int = 8192, chunk: int = 32768,
                  compile: bool = False, rows: int = 25, device: str = "cuda", quant: str = "bf16") -> None:
    """Where the time goes: torch.profiler tables (top kernels by device time, then device time by kind of
    kernel: matmuls, attention, GLA, optimizer, elementwise) of one training step (first n_layer layers, bf16,
    AdamW, no checkpointing), of one cached prefill chunk of `chunk` tokens after a first chunk (first two
    layers; for the 7B one GLA and one SWA layer) and of 16 decode steps after it. compile: the prefill's blocks
    and the decode step compiled as generate.py --compile does (the decode step eager otherwise). quant: the
    prefill and decode on the model `bench.py ttft/decode --quant` run (quantize); the training step stays float.
    On CPU, e.g.: python bench.py profile --preset tiny --seq_len 64 --chunk 32 --device cpu"""
    cuda = device.startswith("cuda")
    dt, act = (torch.bfloat16, ProfilerActivity.CUDA) if cuda else (torch.float32, ProfilerActivity.CPU)
    torch.manual_seed(0)
    with torch.device(device):
        m = GPT(first_layers(preset, n_layer)).to(dt)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=cuda)
    x = torch.randint(0, m.config.vocab_size, (1, seq_len), device=device)

    def train_step():
        m(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):
        train_step()
    print_profile(profiled(train_step, act, device), f"training step: {preset}, {n_layer} layers, {seq_len} tokens, "
                  f"{dt}", rows, cuda)
    opt = None   # frees the optimizer state before the prefill
    m.blocks = m.blocks[:2]
    m.eval()
    quantize(m, quant)
    layers, how = " + ".join(m.config.layout[:2]), ("compiled" if compile else "eager") + f", {quant}"
    if compile:
        kernels.compile_blocks(m)
    ids = torch.randint(0, m.config.vocab_size, (1, 2 * chunk), device=device)
    with torch.no_grad():
        for _ in range(2):                                                  # warm-up (and compile)
            prefill(m, m.new_cache(1, 2 * chunk), ids, chunk)
        cache = m.new_cache(1, 2 * chunk)
        prefill(m, cache, ids[:, :chunk], chunk)
        p = profiled(lambda: prefill(m, cache, ids[:, chunk:], chunk), act, device)
    print_profile(p, f"prefill: a chunk of {chunk} after {chunk}, layers {layers}, {how}", rows, cuda)
    step = m.forward
    if compile:
        step = kernels.compile_decode(m.forward, torch.device(device))
        kernels.static_cache(cache)
    with torch.no_grad():
        tok = greedy_steps(step, cache, ids[:, -1:], 4, compile)         # warm-up (and compile)
        p = profiled(lambda: greedy_steps(step, cache, tok, 16, compile), act, device)
    print_profile(p, f"decode: 16 steps after {2 * chunk} tokens, batch 1, layers {layers}, {how}", rows, cuda)


# ----------------------------------------------------------------------------- mixture of experts alone

# bench.py moe's groups of kernels, tried in order before KINDS: the routed experts' grouped GEMMs (torch._grouped_mm's
# CUTLASS kernels), the copies that stack the experts' weights for each of them, routing (top-k's kernels gather
# too), the sort by expert with its gathers and scatters
MOE_KINDS = (("grouped GEMM (routed experts)", ("grouped", "GroupProblemShape", "PtrArray")),
             ("weights stacked for grouped GEMMs", ("CatArrayBatchedCopy",)),
             ("router softmax, top-k", ("softmax", "topk")),
             ("sort by expert, gather, scatter", ("sort", "searchsorted", "index", "scatter", "gather"))) + KINDS


def ffn_steps(ffn, x, dy):
    """A forward and a forward + backward call of an FFN module (model.MLP, or model.MoE with its balance loss in the
    backward) on rows x [N, C] with output gradient dy."""
    one = torch.ones((), device=x.device)

    def fwd():
        out = ffn(x)
        return out if isinstance(out, tuple) else (out, None)

    def fwd_bwd():
        out, aux = fwd()[:2]
        torch.autograd.backward((out, aux) if aux is not None else out, (dy, one) if aux is not None else dy)
    return fwd, fwd_bwd


def active_params(ffn):
    """Parameters one token goes through: all of a dense FFN's; an MoE's router, shared and top_k routed experts."""
    if not isinstance(ffn, MoE):
        return sum(p.numel() for p in ffn.parameters())
    routed = sum(p.numel() for p in ffn.experts.parameters()) * ffn.c.top_k // ffn.c.n_expert
    return routed + sum(p.numel() for m in (ffn.router, *ffn.shared) for p in m.parameters())


def bench_moe(*, preset: str = "spikingbrain-76b", tokens: int = 8192, loop: bool = True, profile: bool = True,
              rows: int = 15, peak_flops: float | None = None, device: str = "cuda", tiny: bool = False,
              repeats: int = 5) -> None:
    """One MoE layer of `preset` at its real widths (the 76B: 16 routed experts top-1 + 1 shared, each a
    Qwen2.5-7B SwiGLU FFN) on `tokens` random bf16 rows, forward and forward + backward (with the balance loss),
    through model.MoE as training runs it: the routed experts as grouped GEMMs (kernels.MOE_IMPL = "grouped":
    kernels.moe_experts) and, with loop, model.MoE.routed's per-expert loop (MOE_IMPL = "torch": a host sync per
    expert). Beside it in the same run, dense model.MLP SwiGLUs: one of the MoE's active FLOPs per token (width
    (top_k + shared) * intermediate_size: a token's routed and shared experts side by side) and one of an expert's
    width (Qwen2.5-7B's FFN). MFU counts active FLOPs: 6 * the parameters a token goes through (router, shared and
    top_k routed experts; the dense SwiGLU's all), over peak_flops (default kernels.peak_flops). Printed: the MoE's
    MFU over its same-FLOPs dense SwiGLU's (the aim: >= 0.8), the median of `repeats` forward + backward timings of
    the two taken in turn (the GPU's clock drifts between runs: alternating puts both under the same drift), and the
    busiest expert's share of tokens (the random router's routing is near uniform). profile: torch.profiler over
    one grouped forward + backward, top kernels and device time by kind (grouped GEMMs, weight stacking,
    sort/gather/scatter, routing; "matmul": the shared expert and router). tiny: the same code on a CPU, tiny-moe
    on 256 tokens."""
    if tiny:
        preset, tokens, device = "tiny-moe", 256, "cpu"
    dev, dt = torch.device(device), torch.bfloat16
    cuda, c = dev.type == "cuda", Config.from_name(preset)
    peak = peak_flops or kernels.peak_flops(dev)
    width = (c.top_k + c.n_shared_expert) * c.intermediate_size
    served = kernels.has_grouped_mm(dev, dt, c.n_embd, c.intermediate_size)
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {torch.cuda.get_device_name(dev) if cuda else 'cpu'} torch "
          f"{torch.__version__}; {preset} MoE layer: {tokens} tokens x {c.n_embd}, {c.n_expert} experts of width "
          f"{c.intermediate_size}, top-{c.top_k} + {c.n_shared_expert} shared, bf16; torch._grouped_mm " +
          ("serves" if served else "does not serve (masked fallback: every row through every expert)") + "; peak " +
          (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU)"))
    torch.manual_seed(0)
    moe = built(lambda: MoE(c), dev, dt)
    runs = {"MoE, grouped GEMMs (kernels.moe_experts)": ("grouped", moe)}
    if loop:
        runs["MoE, per-expert loop (model.MoE.routed)"] = ("torch", moe)
    for w, what in ((width, "same active FLOPs"), (c.intermediate_size, "one expert's width")):
        runs[f"dense SwiGLU {w} ({what})"] = (None, built(lambda: MLP(Config.from_name(preset, intermediate_size=w)),
                                                          dev, dt))
    x = torch.randn(tokens, c.n_embd, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn_like(x)
    print(f"{'FFN':>48} {'fwd ms':>8} {'fwd+bwd ms':>11} {'GFLOP/token':>12} {'TFLOP/s':>8} {'MFU':>6}")
    impl0, rate = kernels.MOE_IMPL, []
    try:
        for label, (impl, ffn) in runs.items():
            kernels.MOE_IMPL = impl or impl0
            fwd, fwd_bwd = ffn_steps(ffn, x, dy)
            with torch.no_grad():
                t_fwd = ms(fwd, dev)
            t = ms(fwd_bwd, dev, [x, *ffn.parameters()])
            flops = 6 * active_params(ffn)
            rate.append(flops * tokens / t * 1e3)
            mfu = f"{rate[-1] / peak:6.1%}" if peak else f"{'n/a':>6}"
            print(f"{label:>48} {t_fwd:8.2f} {t:11.2f} {flops / 1e9:12.4g} {rate[-1] / 1e12:8.3g} {mfu}", flush=True)
        pair = [runs[label] for label in runs if label.startswith(("MoE, grouped", f"dense SwiGLU {width} "))]
        ratios = [rate[0] / rate[-2]]   # the table's pass, then repeats - 1 more, the two in turn
        for _ in range(repeats - 1):
            t = []
            for impl, ffn in pair:
                kernels.MOE_IMPL = impl or impl0
                t.append(ms(ffn_steps(ffn, x, dy)[1], dev, [x, *ffn.parameters()]) / active_params(ffn))
            ratios.append(t[1] / t[0])   # MFU ratio = (flops_moe / t_moe) / (flops_dense / t_dense)
        kernels.MOE_IMPL = "grouped"
        fwd, fwd_bwd = ffn_steps(moe, x, dy)
        with torch.no_grad():
            load = fwd()[2]
        print(f"MoE grouped / dense SwiGLU {width} (same active FLOPs): {statistics.median(ratios):.2f}x its MFU "
              f"(aim >= 0.8; median of {len(ratios)} alternated runs: {', '.join(f'{r:.2f}' for r in ratios)}); "
              f"busiest expert {load.max():.1%} of the routed tokens (uniform {1 / c.n_expert:.1%})", flush=True)
        if profile:
            p = profiled(fwd_bwd, ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU, dev)
            print_profile(p, f"MoE forward + backward, grouped GEMMs, {tokens} tokens", rows, cuda, MOE_KINDS)
    finally:
        kernels.MOE_IMPL = impl0


def main(args=None):
    """`python bench.py <subcommand> ...`: args as sys.argv[1:] (None: those); returns the subcommand's result."""
    return CLI({"kernels": bench_kernels, "spike_gemm": bench_spike_gemm, "gemv": bench_gemv, "ttft": bench_ttft,
                "decode": bench_decode, "serve": bench_serve, "train": bench_train, "profile": bench_profile,
                "swa": bench_swa, "moe": bench_moe}, args=args)


if __name__ == "__main__":
    main()

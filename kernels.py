"""Every fast path of model.py, each beside the switch that chooses it and with a twin in model.py that the tests
compare against:
- Triton kernels for gated linear attention: chunked forward + backward (packed documents too) and a decode step
  (twins: model.gla_recurrent / gla_chunked);
- softmax attention of one query over a cache (decode_attention), flex_attention with the block masks of a sliding
  window (only the band's tiles) and of packed documents / sinks / a cache, with kernel options per device and a
  fallback (twin: model.attention, SDPA with a dense mask);
- the loss in chunks of rows with its gradient made in the same pass, compiled on CUDA (twin: cross-entropy of the
  full logits); torch.compile of the blocks and of the decode step; spike quantization (twin: model.spike_quant).
- MoE experts as grouped GEMMs over the tokens sorted by expert, no host sync (torch._grouped_mm on Hopper, a masked
  twin elsewhere; twin: model.MoE.routed, a loop over the experts).
- W8ASpike's linear layers as int8 spike counts times INT8 weights on 8-bit tensor cores, exact integer sums
  (spike_linear; twin: spike_linear_torch in float64; spiking.W8ASpikeLinear's dispatch line picks it).
- the same spiking layers on FP8 tensor cores: counts as e4m3 with vth as the row scale, e4m3 weights per output
  channel, torch._scaled_mm (spike_linear_fp8; twin: spike_linear_fp8_torch in float64; spiking.FP8SpikeLinear).
- decode with INT8 weights (weight-only): a batch-small GEMV reading the 8-bit weights and dequantizing them in
  registers (int8_gemv; twin: int8_gemv_torch in float64; spiking.W8ASpikeLinear with spike_k=None picks it).
- decode with W8ASpike layers: the same GEMV on the exact spike counts (two rows each, exact in fp16 below 65504,
  else in tf32), no host sync (w8aspike_gemv; twin: spike_linear_torch; spiking.W8ASpikeLinear with a spike k picks
  it for decode rows).
- decode with e4m3 weights: the same GEMV kernel reading the e4m3 bytes, the counts rounded to e4m3 (a row past 448
  kept exact) by a select, no host sync, so compiled decode keeps it in its graph (fp8_gemv; twin:
  spike_linear_fp8_torch in float64; spiking.FP8SpikeLinear picks it for up to INT8_GEMV_MAX_ROWS rows).
- decode of one row (batch 1) with 8-bit weights: gemv_row, one launch a projection on the CUDA cores (int8 groups,
  e4m3; vth, bias and the cast inside), taken by the three GEMVs above (twins: int8_gemv_torch,
  spike_linear_fp8_torch).
- context parallelism, prefill and training: one sequence split over the ranks of a torch.distributed group (packed
  documents may cross the slices; every rank runs the sinks), GLA states passed on in one all-gather per layer, the
  keys before each slice fetched (SWA: the window's; full attention: all), the gradients sent back through the
  gathers (cp_*; twin: model.GPT.forward and its backward in one process); cp_prefill takes a long prompt in rounds
  (the last rank's cache shared between them); cp_launch starts the ranks' processes.
GLA_IMPL and ATTN_IMPL force either path; model.py imports nothing else of this file but the `use_*` predicates, the
ops they guard and the cp_* steps of a split sequence. Nothing here imports model.py: what it needs of it (a cache,
model.attention) comes as arguments.

Layout everywhere: [B, T, H, D]. GLA recurrence per head, with log-decay g <= 0:
    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,    o_t = (q_t * scale) S_t.
GQA: k, v, g may have fewer heads than q; each kv head's state serves its group of query heads (the forward
scans each state once; the backward runs one copy per query head and sums the copies' gradients).

Chunked algorithm (chunk C = 64 positions). Inside a chunk, b = cumsum(g) is the log-decay from the
chunk start, B = b at the last position. With S0 the state entering the chunk:
    o       = (q e^b) S0 + A v,      A[t, s] = sum_d q_td k_sd e^(b_td - b_sd)  (s <= t)
    S_end   = e^B S0 + (k e^(B - b))^T v
Kernels: the forward's state pass is split in two: _chunk_state_kernel computes every chunk's own term
(k e^(B - b))^T v and B in parallel, then _state_scan_kernel walks the chunks of each document in order,
S <- e^B S + term, storing every chunk's incoming state h: the serial loop is one multiply-add per chunk
(one kernel doing both would leave most of the GPU idle at prefill's 4 kv heads). The
backward's _scan_kernel walks the chunks in both directions in one launch: forward for h again, in reverse
for dh, the gradient of each chunk's outgoing state. Then kernels over (chunk, head) do the intra-chunk
work in parallel:
_chunk_kernel (o, or with DV=True dv = Aᵀ do + k e^(B - b) dh: the same loop), _bwd_dqkg_kernel (dq, dk, dg).

Numerics: every exponent is <= 0 except the key factor k e^(r - b) of the intra-chunk scores, whose
exponent is the decay across one group of rows (r = log-decay just before the group; one group of 64
by default). That factor is used only when every group's decay is <= MAX_EXP; each chunk-kernel is
launched twice, the second time compiled with PAIRWISE=True for the chunks the first one flagged:
exact e^(b_t - b_s) per pair, slower. So no exponential ever exceeds e^MAX_EXP.

Backward of g: with dG = q*dq - k*dk per position, dg_t = sum_{u >= t in chunk} dG_u + sum_v(S_end*dS_end),
and the last term is e^B * sum_v(S0*dh) + sum_s k_s e^(B - b_s) * (v_s dh^T), all at hand in one chunk.
"""
import datetime
import logging
import os
import pickle
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CHUNK = 64
MAX_EXP = 50.0        # largest exponent of any exp on the fast path (e^50 ~ 5e21, far from fp32/bf16 overflow)
HEAD_DIMS = (16, 32, 64, 128)
# Launch settings per kernel, the fastest of a sweep on an H100 (T=16k, H=28, D=128, bf16, gates /16). On a device
# where they do not fit (a GPU with less shared memory or fewer registers per SM), `tuned` falls back to SAFE_CONFIG
# with one warning: a tuning constant never stops a run.
# groups=2 (two reference points per chunk) keeps chunks whose decay exceeds MAX_EXP on the fast path,
# e.g. raw logsigmoid gates (~60 per chunk), but is slower on SpikingBrain's gates (logsigmoid / 16), which never
# need it.
# split_scan=False runs the forward's state pass as one kernel (_scan_kernel's direction 0): slower, but it
# needs no float32 buffer for the chunk terms (chunks x kv heads x K x V x 4 bytes: 134 MB at T=32k, 4 heads).
# The split scan's settings ("terms", "state") are the fastest of a sweep at T=32k, 4 kv heads (prefill).
CONFIG = dict(scan_bk=64, scan_bv=64, scan_warps=4, scan_stages=3, fwd_bk=64, fwd_warps=4, fwd_stages=1,
              dv_bk=64, dv_warps=4, dv_stages=1, dqkg_bk=64, dqkg_warps=4, dqkg_stages=1, groups=1,
              split_scan=True, terms_bk=64, terms_bv=64, terms_warps=4, terms_stages=1,
              state_bk=32, state_bv=32, state_warps=4, state_stages=3)
SAFE_CONFIG = dict(CONFIG, **{k: 32 for k in CONFIG if k.endswith(("_bk", "_bv"))},
                   **{k: 1 for k in CONFIG if k.endswith("_stages")}, **{k: 4 for k in CONFIG if k.endswith("_warps")})
options_failed = set()   # keys of kernel calls whose tuned options did not compile on this device (with_fallback)


def with_fallback(call, opts, key, what):
    """call(opts), or call(None) (the defaults) for a key whose options did not compile: the first failure (Triton's
    OutOfResources: shared memory, registers) is caught, warned about once and remembered per key."""
    if not opts or key in options_failed:
        return call(None)
    if torch.compiler.is_compiling():   # traced into a compiled graph, a failure would surface outside this call
        return call(opts)
    try:
        return call(opts)
    except Exception as e:
        if "OutOfResources" not in f"{type(e).__name__} {e}" and "No valid triton configs" not in str(e):
            raise
        options_failed.add(key)
        warnings.warn(f"{what}: kernel options {opts} do not compile here ({str(e).splitlines()[0][:160]}); "
                      f"using the defaults", stacklevel=3)
        return call(None)


def tuned(run, device, what):
    """run(CONFIG), or run(SAFE_CONFIG) on a device where CONFIG's launches do not fit."""
    return with_fallback(lambda cfg: run(cfg or SAFE_CONFIG), CONFIG, ("gla", str(device)), what)


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _chunk_rows(g, x, y, rows, eos, i_h, o_k, o_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """One chunk's rows of head i_h (rows past eos read as 0): the log-decay b = cumsum(g) from the chunk start
    and its total B, x's [C, BK] block (float32) and y's [C, BV] block."""
    m = (rows < eos)[:, None]
    gk = tl.load(g + rows[:, None] * H * K + i_h * K + o_k[None, :], mask=m, other=0).to(tl.float32)
    xk = tl.load(x + rows[:, None] * H * K + i_h * K + o_k[None, :], mask=m, other=0).to(tl.float32)
    yv = tl.load(y + rows[:, None] * H * V + i_h * V + o_v[None, :], mask=m, other=0)
    return tl.cumsum(gk, 0), tl.sum(gk, 0), xk, yv


@triton.jit
def _scan_kernel(q, k, v, do, g, h, dh, s_in, s_in_rev, s_out, s_out_rev, cu_seqlens, chunk_offsets, scale,
                 flags, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """State passing over the chunks of one document, one [BK, BV] block of the state.

    Direction 0 (forward): h[c] = state entering chunk c;  S <- e^B S + (k e^(B-b))^T v.
    Direction 1 (backward): dh[c] = grad of the state leaving chunk c;  dS <- e^B dS + (scale q e^b)^T do.
    Both directions run in one launch (program_id 2), so the backward's two scans fill the GPU together.
    flags bits: 0 load s_in, 1 store s_out, 2 load s_in_rev, 3 store s_out_rev.
    """
    i_kv, i_nh, rev = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // (V // BV), i_kv % (V // BV)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, C)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    if rev == 0:
        x, y, buf, st_in, st_out = k, v, h, s_in, s_out
    else:
        x, y, buf, st_in, st_out = q, do, dh, s_in_rev, s_out_rev
    mult = tl.where(rev == 0, 1.0, scale)
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    p_state = i_nh * K * V + o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if (flags >> (2 * rev)) & 1:
        S = tl.load(st_in + p_state)
    for i in range(n_chunks):
        c = i + rev * (n_chunks - 1 - 2 * i)                      # chunk index, reversed for direction 1
        tl.store(buf + ((c0 + c) * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                 S.to(buf.dtype.element_ty))
        b, b_last, xk, yv = _chunk_rows(g, x, y, bos + c * C + o_c, eos, i_h, o_k, o_v, H, K, V)
        # forward: decay from each position to the chunk end; backward: from the chunk start to it
        xk = xk * (tl.exp(tl.where(rev == 0, b_last[None, :] - b, b)) * mult)
        S = S * tl.exp(b_last)[:, None] + tl.dot(tl.trans(xk.to(DT)), yv.to(DT), input_precision=PREC)
    if (flags >> (2 * rev + 1)) & 1:
        tl.store(st_out + p_state, S)


@triton.jit
def _chunk_state_kernel(k, v, g, L, logdecay, cu_seqlens, chunk_indices, H: tl.constexpr, K: tl.constexpr,
                        V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                        PREC: tl.constexpr):
    """The forward scan's parallel half: every chunk's own term of the state it leaves, L[c] = (k e^(B-b))^T v,
    and its total log-decay B, one [BK, BV] block per program. Nothing here waits on another chunk."""
    i_c, i_kv, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)    # chunks first: grid axis 0 is large
    i_k, i_v = i_kv // (V // BV), i_kv % (V // BV)
    i_n, i_t = tl.load(chunk_indices + i_c * 2).to(tl.int64), tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    b, b_last, xk, yv = _chunk_rows(g, k, v, bos + i_t * C + tl.arange(0, C), eos, i_h, o_k, o_v, H, K, V)
    xk = xk * tl.exp(b_last[None, :] - b)
    base = (i_c * H + i_h).to(tl.int64)
    tl.store(L + base * K * V + o_k[:, None] * V + o_v[None, :],
             tl.dot(tl.trans(xk.to(DT)), yv.to(DT), input_precision=PREC))
    if i_v == 0:
        tl.store(logdecay + base * K + o_k, b_last)


@triton.jit
def _state_scan_kernel(L, logdecay, h, s_in, s_out, cu_seqlens, chunk_offsets, flags, H: tl.constexpr,
                       K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The forward scan's serial half, over the chunks of one document: h[c] = S, then S <- e^B S + L[c].
    Its loads do not depend on S, so they run ahead of the one multiply-add that does."""
    i_kv, i_nh = tl.program_id(0), tl.program_id(1)
    i_k, i_v = i_kv // (V // BV), i_kv % (V // BV)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    block = o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if flags & 1:
        S = tl.load(s_in + i_nh * K * V + block)
    for c in range(tl.cdiv(eos - bos, C)):
        base = ((c0 + c) * H + i_h).to(tl.int64)
        tl.store(h + base * K * V + block, S.to(h.dtype.element_ty))
        S = S * tl.exp(tl.load(logdecay + base * K + o_k))[:, None] + tl.load(L + base * K * V + block)
    if (flags >> 1) & 1:
        tl.store(s_out + i_nh * K * V + block, S)


@triton.jit
def _group_factors(g, b, gi: tl.constexpr, C: tl.constexpr, NG: tl.constexpr, MAXE: tl.constexpr):
    """Factors of the intra-chunk scores for query rows in group gi (rows [lo, hi)), reference r = log-decay
    just before the group: fq = e^(b - r) on the group's rows, fk = e^(r - b) on rows < hi (keys it sees)."""
    rows = tl.arange(0, C)[:, None]
    lo, hi = gi * (C // NG), (gi + 1) * (C // NG)
    r = tl.sum(tl.where(rows < lo, g, 0.0), 0)[None, :]
    fq = tl.where((rows >= lo) & (rows < hi), tl.exp(tl.minimum(b - r, 0.0)), 0.0)
    fk = tl.where(rows < hi, tl.exp(tl.minimum(r - b, MAXE)), 0.0)   # exact on rows < hi when the chunk is fast
    return fq, fk


@triton.jit
def _is_fast(g, C: tl.constexpr, NG: tl.constexpr, MAXE: tl.constexpr):
    """True when each group's total decay (per channel) is at most MAXE, so factored scores cannot overflow."""
    rows = tl.arange(0, C)[:, None]
    worst = 0.0
    for gi in tl.static_range(NG):
        in_group = (rows >= gi * (C // NG)) & (rows < (gi + 1) * (C // NG))
        worst = tl.minimum(worst, tl.min(tl.sum(tl.where(in_group, g, 0.0), 0), 0))
    return worst >= -MAXE


@triton.jit
def _scores(qs, k, g, b, g_rows, k_rows, row_stride, n_rows, C: tl.constexpr, K: tl.constexpr,
            NG: tl.constexpr, MAXE: tl.constexpr, PAIRWISE: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """A[t, s] = sum_d qs_td k_sd e^(b_td - b_sd) for s <= t (0 above the diagonal), fp32 [C, C]."""
    rows, cols = tl.arange(0, C), tl.arange(0, C)
    A = tl.zeros([C, C], dtype=tl.float32)
    if PAIRWISE:                                  # exact decay per pair, one key row at a time
        o_d = tl.arange(0, K)
        b_s = tl.zeros([K], dtype=tl.float32)
        for s in range(C):
            m = o_d * 0 + s < n_rows              # (a vector mask: the interpreter rejects scalar & vector)
            b_s += tl.load(g_rows + s * row_stride + o_d, mask=m, other=0).to(tl.float32)
            k_s = tl.load(k_rows + s * row_stride + o_d, mask=m, other=0).to(tl.float32)
            col = tl.sum(qs * k_s[None, :] * tl.exp(tl.minimum(b - b_s[None, :], 0.0)), 1)
            A = tl.where(cols[None, :] == s, col[:, None], A)
    else:
        for gi in tl.static_range(NG):
            fq, fk = _group_factors(g, b, gi, C, NG, MAXE)
            A += tl.dot((qs * fq).to(DT), tl.trans((k * fk).to(DT)), input_precision=PREC)
    return tl.where(rows[:, None] >= cols[None, :], A, 0.0)


@triton.jit
def _dq_intra(dA, k, g, b, g_rows, k_rows, row_stride, n_rows, C: tl.constexpr, BK: tl.constexpr,
              NG: tl.constexpr, MAXE: tl.constexpr, PAIRWISE: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """dqs_t = sum_{s <= t} dA_ts k_s e^(b_t - b_s), fp32 [C, BK] (dA is already causal)."""
    out = tl.zeros([C, BK], dtype=tl.float32)
    if PAIRWISE:
        cols, o_d = tl.arange(0, C), tl.arange(0, BK)
        b_s = tl.zeros([BK], dtype=tl.float32)
        for s in range(C):
            m = o_d * 0 + s < n_rows
            b_s += tl.load(g_rows + s * row_stride + o_d, mask=m, other=0).to(tl.float32)
            k_s = tl.load(k_rows + s * row_stride + o_d, mask=m, other=0).to(tl.float32)
            col = tl.sum(tl.where(cols[None, :] == s, dA.to(tl.float32), 0.0), 1)      # dA[:, s]
            out += col[:, None] * k_s[None, :] * tl.exp(tl.minimum(b - b_s[None, :], 0.0))
    else:
        for gi in tl.static_range(NG):
            fq, fk = _group_factors(g, b, gi, C, NG, MAXE)
            out += fq * tl.dot(dA, (k * fk).to(DT), input_precision=PREC)
    return out


@triton.jit
def _dk_intra(dA, qs, g, b, g_rows, row_stride, n_rows, C: tl.constexpr, BK: tl.constexpr,
              NG: tl.constexpr, MAXE: tl.constexpr, PAIRWISE: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """dk_s = sum_{t >= s} dA_ts qs_t e^(b_t - b_s), fp32 [C, BK]."""
    out = tl.zeros([C, BK], dtype=tl.float32)
    if PAIRWISE:
        rows, cols, o_d = tl.arange(0, C), tl.arange(0, C), tl.arange(0, BK)
        b_s = tl.zeros([BK], dtype=tl.float32)
        for s in range(C):
            m = o_d * 0 + s < n_rows
            b_s += tl.load(g_rows + s * row_stride + o_d, mask=m, other=0).to(tl.float32)
            col = tl.sum(tl.where(cols[None, :] == s, dA.to(tl.float32), 0.0), 1)      # dA[:, s]
            row = tl.sum(col[:, None] * qs * tl.exp(tl.minimum(b - b_s[None, :], 0.0)), 0)
            out = tl.where(rows[:, None] == s, row[None, :], out)
    else:
        for gi in tl.static_range(NG):
            fq, fk = _group_factors(g, b, gi, C, NG, MAXE)
            out += fk * tl.dot(tl.trans(dA), (qs * fq).to(DT), input_precision=PREC)
    return out


@triton.jit
def _chunk_setup(chunk_indices, cu_seqlens, i_c, C: tl.constexpr):
    """First position of chunk i_c and the end of its document."""
    i_n, c = tl.load(chunk_indices + 2 * i_c), tl.load(chunk_indices + 2 * i_c + 1)
    bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    return bos + c * C, eos


@triton.jit
def _chunk_kernel(q, k, g, x, s, out, slow, cu_seqlens, chunk_indices, scale,
                  H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr, NG: tl.constexpr, MAXE: tl.constexpr, PAIRWISE: tl.constexpr, DT: tl.constexpr,
                  PREC: tl.constexpr, DV: tl.constexpr):
    """One chunk of one head, summing over blocks of K (few live tiles) with A = the chunk's decayed scores:
    forward (DV=False, x = v, s = h[chunk]):   out = o  = (scale q e^b) s + A x;
    dv      (DV=True,  x = do, s = dh[chunk]): out = dv = k_out s + A^T x (k_out: keys decayed to the chunk end,
    dh: grad of the state leaving the chunk). Launched twice: PAIRWISE=False does the chunks whose decay allows
    factored scores and flags the others in `slow`; PAIRWISE=True does the flagged ones (compiled apart, so the
    fast kernel stays lean). GQA (forward): q, out have H heads; k, g, x, s have H / G, head i_h // G. Programs
    run head-fastest, so the G heads that read one kv head's chunk run together."""
    HK: tl.constexpr = H // G
    i_h, i_c = tl.program_id(0) % H, tl.program_id(0) // H
    i_kv = i_h // G
    if PAIRWISE:
        if tl.load(slow + i_c * H + i_h) == 0:
            return
    t0, eos = _chunk_setup(chunk_indices, cu_seqlens, i_c, C)
    rows, cols, o_v = tl.arange(0, C), tl.arange(0, C), tl.arange(0, V)
    m = (t0 + rows < eos)[:, None]
    p_s = s + (i_c * HK + i_kv).to(tl.int64) * K * V
    A = tl.zeros([C, C], dtype=tl.float32)
    acc = tl.zeros([C, V], dtype=tl.float32)
    fast = True
    for i in tl.static_range(K // BK):
        o_d = i * BK + tl.arange(0, BK)
        p_kd = (t0 + rows)[:, None] * HK * K + i_kv * K + o_d[None, :]
        gd = tl.load(g + p_kd, mask=m, other=0).to(tl.float32)
        p_qd = (t0 + rows)[:, None] * H * K + i_h * K + o_d[None, :]
        qd = tl.load(q + p_qd, mask=m, other=0).to(tl.float32) * scale
        kd = tl.load(k + p_kd, mask=m, other=0).to(tl.float32)
        bd = tl.cumsum(gd, 0)
        fast = fast & _is_fast(gd, C, NG, MAXE)
        row0 = t0 * HK * K + i_kv * K + i * BK
        A += _scores(qd, kd, gd, bd, g + row0, k + row0, HK * K, eos - t0, C, BK, NG, MAXE, PAIRWISE, DT, PREC)
        if DV:
            lhs = kd * tl.exp(tl.sum(gd, 0)[None, :] - bd)                     # keys decayed to the chunk end
        else:
            lhs = qd * tl.exp(bd)                                              # queries decayed from chunk start
        acc += tl.dot(lhs.to(DT), tl.load(p_s + o_d[:, None] * V + o_v[None, :]).to(DT), input_precision=PREC)
    if not PAIRWISE:
        tl.store(slow + i_c * H + i_h, tl.where(fast, 0, 1).to(tl.int8))
        if fast == 0:
            return
    A = tl.where(rows[:, None] >= cols[None, :], A, 0.0).to(DT)
    if DV:
        A = tl.trans(A)
    p_x = x + (t0 + rows)[:, None] * HK * V + i_kv * V + o_v[None, :]
    acc += tl.dot(A, tl.load(p_x, mask=m, other=0).to(DT), input_precision=PREC)
    tl.store(out + (t0 + rows)[:, None] * H * V + i_h * V + o_v[None, :], acc.to(out.dtype.element_ty), mask=m)


@triton.jit
def _bwd_dqkg_kernel(q, k, v, g, h, dh, do, dq, dk, dg, slow, cu_seqlens, chunk_indices, scale,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                     NG: tl.constexpr, MAXE: tl.constexpr, PAIRWISE: tl.constexpr, DT: tl.constexpr,
                     PREC: tl.constexpr):
    """dq, dk, dg of one chunk, one head, BK channels (all separable by channel once dA = do v^T is known).
    Runs after _chunk_kernel's dv launches, whose flags in `slow` say which of the two launches does each chunk."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if (tl.load(slow + i_c * H + i_h) != 0) != PAIRWISE:
        return
    t0, eos = _chunk_setup(chunk_indices, cu_seqlens, i_c, C)
    rows, cols, o_v = tl.arange(0, C), tl.arange(0, C), tl.arange(0, V)
    m = (t0 + rows < eos)[:, None]
    p_v = (t0 + rows)[:, None] * H * V + i_h * V + o_v[None, :]
    vv = tl.load(v + p_v, mask=m, other=0).to(DT)
    dov = tl.load(do + p_v, mask=m, other=0).to(DT)
    dA = tl.dot(dov, tl.trans(vv), input_precision=PREC)
    dA = tl.where(rows[:, None] >= cols[None, :], dA, 0.0).to(DT)
    o_d = i_k * BK + tl.arange(0, BK)
    p_d = (t0 + rows)[:, None] * H * K + i_h * K + o_d[None, :]
    p_h = (i_c * H + i_h).to(tl.int64) * K * V + o_d[:, None] * V + o_v[None, :]
    hd = tl.load(h + p_h)
    dhd = tl.load(dh + p_h)
    dk_h = tl.dot(vv, tl.trans(dhd.to(DT)), input_precision=PREC)               # v dh^T
    dq_h = tl.dot(dov, tl.trans(hd.to(DT)), input_precision=PREC)               # do h^T
    h_dh = tl.sum(hd.to(tl.float32) * dhd.to(tl.float32), 1)
    gd = tl.load(g + p_d, mask=m, other=0).to(tl.float32)
    bd = tl.cumsum(gd, 0)
    b_last = tl.sum(gd, 0)
    kd = tl.load(k + p_d, mask=m, other=0).to(tl.float32)
    qd = tl.load(q + p_d, mask=m, other=0).to(tl.float32) * scale
    row0 = t0 * H * K + i_h * K + i_k * BK
    to_end = tl.exp(b_last[None, :] - bd)
    dkd = _dk_intra(dA, qd, gd, bd, g + row0, H * K, eos - t0, C, BK, NG, MAXE, PAIRWISE, DT, PREC) + to_end * dk_h
    tl.store(dk + p_d, dkd.to(dk.dtype.element_ty), mask=m)
    dqd = _dq_intra(dA, kd, gd, bd, g + row0, k + row0, H * K, eos - t0, C, BK, NG, MAXE, PAIRWISE, DT,
                    PREC) + tl.exp(bd) * dq_h
    tl.store(dq + p_d, (dqd * scale).to(dq.dtype.element_ty), mask=m)
    # dg: reverse cumsum of q dq - k dk inside the chunk, plus what flows to later chunks,
    # sum_v(S_end * dS_end) = e^B sum_v(h * dh) + sum_s k_out_s * (v_s dh^T)
    after = tl.exp(b_last) * h_dh + tl.sum(kd * to_end * dk_h, 0)
    dG = qd * dqd - kd * dkd
    tl.store(dg + p_d, (tl.cumsum(dG, 0, reverse=True) + after[None, :]).to(dg.dtype.element_ty), mask=m)


@triton.jit
def _recurrent_kernel(q, k, v, g, o, s_in, s_out, cu_seqlens, scale, H: tl.constexpr, G: tl.constexpr,
                      K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, HAS_IN: tl.constexpr,
                      STORE_OUT: tl.constexpr):
    """Step-by-step recurrence for one document, one kv head (H of them here) and its G query heads, BV columns of
    the state (decode)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_k, o_v = tl.arange(0, K), i_v * BV + tl.arange(0, BV)
    p_state = i_nh * K * V + o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([K, BV], dtype=tl.float32)
    if HAS_IN:
        S = tl.load(s_in + p_state)
    for t in range(bos, eos):
        kt = tl.load(k + t * H * K + i_h * K + o_k).to(tl.float32)
        gt = tl.load(g + t * H * K + i_h * K + o_k).to(tl.float32)
        vt = tl.load(v + t * H * V + i_h * V + o_v).to(tl.float32)
        S = S * tl.exp(gt)[:, None] + kt[:, None] * vt[None, :]
        for j in tl.static_range(G):
            i_q = i_h * G + j
            qt = tl.load(q + t * H * G * K + i_q * K + o_k).to(tl.float32) * scale
            tl.store(o + t * H * G * V + i_q * V + o_v, tl.sum(qt[:, None] * S, 0).to(o.dtype.element_ty))
    if STORE_OUT:
        tl.store(s_out + p_state, S)


@triton.jit
def _decode_attention_kernel(q, k, v, bias, o, lse, qk_scale, S, SPLIT, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h,
                             H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                             BN: tl.constexpr, NS: tl.constexpr, PREC: tl.constexpr):
    """One query per row over one split of a kv head's S cache slots: the G query heads of kv head i_h are the
    rows of a [GP, D] block (GP >= 16 for tl.dot). Stores the split's normalized output and its log2-sum-exp."""
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows, o_d = tl.arange(0, GP), tl.arange(0, D)
    qb = tl.load(q + (i_bh * G + rows[:, None]) * D + o_d[None, :], mask=rows[:, None] < G, other=0.0)
    m = tl.full([GP], -1e30, tl.float32)                  # finite: a split whose keys are all hidden stays 0
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    lo = i_s * SPLIT
    hi = tl.minimum(lo + SPLIT, S)
    for start in range(lo, hi, BN):
        n = start + tl.arange(0, BN)
        kb = tl.load(k + i_b * sk_b + n[:, None] * sk_s + i_h * sk_h + o_d[None, :], mask=n[:, None] < hi,
                     other=0.0)
        s = (tl.dot(qb, tl.trans(kb), input_precision=PREC) * qk_scale).to(tl.float32)   # [GP, BN], log2 units
        s += tl.load(bias + i_b * S + n, mask=n < hi, other=float("-inf"))[None, :]
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        vb = tl.load(v + i_b * sv_b + n[:, None] * sv_s + i_h * sv_h + o_d[None, :], mask=n[:, None] < hi,
                     other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
    part = (i_bh * NS + i_s) * G + rows
    tl.store(o + part[:, None] * D + o_d[None, :], acc / tl.maximum(l, 1e-30)[:, None], mask=rows[:, None] < G)
    tl.store(lse + part, tl.where(l > 0, m + tl.log2(tl.maximum(l, 1e-30)), float("-inf")), mask=rows < G)


# ----------------------------------------------------------------------------- launchers

def _dot_types(dtype):
    """Matmul operand type and precision: bf16 stays bf16; fp16 goes through fp32 (the score factors
    can exceed fp16's range) with tf32; fp32 is exact."""
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32"
    return tl.float32, ("tf32" if dtype == torch.float16 else "ieee")


def _opts(cfg, kernel):
    return dict(num_warps=cfg[kernel + "_warps"], num_stages=cfg[kernel + "_stages"])


def _chunk_meta(cu_seqlens, B, T, device):
    """Documents as (cu_seqlens int32 [N+1], chunk_offsets int32 [N+1], chunk_indices int32 [NC, 2])."""
    if cu_seqlens is None:                                      # B documents of length T, no host sync
        n = triton.cdiv(T, CHUNK)
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)
        offsets = torch.arange(0, B * n + 1, n, dtype=torch.int32, device=device)
        idx = torch.arange(B * n, dtype=torch.int32, device=device)
        return cu, offsets, torch.stack([idx // n, idx % n], 1).contiguous()
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    n = [triton.cdiv(x, CHUNK) for x in lens]
    offsets = torch.tensor([0] + n, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    idx = torch.tensor([(d, c) for d, nd in enumerate(n) for c in range(nd)], dtype=torch.int32).view(-1, 2)
    return cu_seqlens.to(torch.int32), offsets.to(device), idx.to(device)


def _scan(q, k, v, do, g, h0, dht, meta, scale, backward, cfg):
    """Run the state scans: forward only (h, final state) or both directions (h, dh, dh0)."""
    cu, offsets, idx = meta
    H, K, V = k.shape[2], k.shape[3], v.shape[3]                  # the state's heads: k's (q's in the backward)
    N, NC = cu.numel() - 1, idx.shape[0]
    BK, BV = min(cfg["scan_bk"], K), min(cfg["scan_bv"], V)
    DT, PREC = _dot_types(q.dtype)
    sdt = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    h = k.new_empty(NC, H, K, V, dtype=sdt)
    dh = k.new_empty(NC, H, K, V, dtype=sdt) if backward else h
    ht = k.new_empty(N, H, K, V, dtype=torch.float32)
    dh0 = k.new_empty(N, H, K, V, dtype=torch.float32) if backward else ht
    if not backward and cfg["split_scan"]:   # forward: chunk terms in parallel, then a short serial pass
        L = k.new_empty(NC, H, K, V, dtype=torch.float32)
        logdecay = k.new_empty(NC, H, K, dtype=torch.float32)
        BK, BV = min(cfg["terms_bk"], K), min(cfg["terms_bv"], V)
        _chunk_state_kernel[(NC, triton.cdiv(K, BK) * triton.cdiv(V, BV), H)](
            k, v, g, L, logdecay, cu, idx, H=H, K=K, V=V, C=CHUNK, BK=BK, BV=BV, DT=DT, PREC=PREC, **_opts(cfg, "terms"))
        BK, BV = min(cfg["state_bk"], K), min(cfg["state_bv"], V)
        _state_scan_kernel[(triton.cdiv(K, BK) * triton.cdiv(V, BV), N * H)](
            L, logdecay, h, h0 if h0 is not None else ht, ht, cu, offsets, int(h0 is not None) | 2, H=H, K=K, V=V,
            C=CHUNK, BK=BK, BV=BV, **_opts(cfg, "state"))
        return h, ht
    flags = (h0 is not None) | ((not backward) << 1) | ((dht is not None) << 2) | (backward << 3)
    dummy = ht
    grid = (triton.cdiv(K, BK) * triton.cdiv(V, BV), N * H, 2 if backward else 1)
    _scan_kernel[grid](q, k, v, do if do is not None else v, g, h, dh, h0 if h0 is not None else dummy,
                       dht if dht is not None else dummy, ht, dh0, cu, offsets, scale, flags,
                       H=H, K=K, V=V, C=CHUNK, BK=BK, BV=BV, DT=DT, PREC=PREC, **_opts(cfg, "scan"))
    return (h, dh, dh0) if backward else (h, ht)


def _forward(q, k, v, g, scale, h0, meta, cfg):
    """o [1, T, H, V] and the final states; k, v, g and the states have H / G heads (GQA): the scan runs once per
    kv head, the chunk kernel once per query head."""
    cu, _, idx = meta
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    h, ht = _scan(q, k, v, None, g, h0, None, meta, scale, False, cfg)
    o = v.new_empty(*q.shape[:3], V)
    slow = torch.empty(idx.shape[0] * H, dtype=torch.int8, device=q.device)
    DT, PREC = _dot_types(q.dtype)
    for pairwise in (False, True):
        _chunk_kernel[(idx.shape[0] * H,)](q, k, g, v, h, o, slow, cu, idx, scale, H=H, G=H // k.shape[2], K=K,
                                           V=V, C=CHUNK, BK=min(cfg["fwd_bk"], K), NG=cfg["groups"],
                                           MAXE=MAX_EXP, PAIRWISE=pairwise, DT=DT, PREC=PREC, DV=False,
                                           **_opts(cfg, "fwd"))
    return o, ht


def _backward(q, k, v, g, do, scale, h0, dht, meta, cfg):
    cu, _, idx = meta
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    h, dh, dh0 = _scan(q, k, v, do, g, h0, dht, meta, scale, True, cfg)
    dq, dk, dv, dg = (torch.empty_like(x) for x in (q, k, v, g))
    slow = torch.empty(idx.shape[0] * H, dtype=torch.int8, device=q.device)
    DT, PREC = _dot_types(q.dtype)
    common = dict(H=H, K=K, V=V, C=CHUNK, NG=cfg["groups"], MAXE=MAX_EXP, DT=DT, PREC=PREC)
    for pairwise in (False, True):
        _chunk_kernel[(idx.shape[0] * H,)](q, k, g, do, dh, dv, slow, cu, idx, scale, G=1,
                                           BK=min(cfg["dv_bk"], K), PAIRWISE=pairwise, DV=True, **common,
                                           **_opts(cfg, "dv"))
    BK = min(cfg["dqkg_bk"], K)
    for pairwise in (False, True):
        _bwd_dqkg_kernel[(idx.shape[0], H, K // BK)](q, k, v, g, h, dh, do, dq, dk, dg, slow, cu, idx, scale, BK=BK,
                                                     PAIRWISE=pairwise, **common, **_opts(cfg, "dqkg"))
    return dq, dk, dv, dg, dh0


# ----------------------------------------------------------------------------- autograd

class ChunkGLA(torch.autograd.Function):
    """Inputs already checked, contiguous, documents packed along T (batch 1)."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0, output_final_state, meta):
        o, ht = tuned(lambda cfg: _forward(q, k, v, g, scale, h0, meta, cfg), q.device, "chunk_gla forward")
        ctx.save_for_backward(q, k, v, g, h0, *meta)
        ctx.scale = scale
        return o, (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        """With GQA the backward runs on G copies of each kv head (its state recomputed per query head) and sums
        the copies' gradients: the gradients of the shared state, at the cost of the backward on repeated heads."""
        q, k, v, g, h0, *meta = ctx.saved_tensors
        G = q.shape[2] // k.shape[2]
        if G > 1:    # the final state is each copy's: its gradient is shared among them
            k, v, g = (x.repeat_interleave(G, 2) for x in (k, v, g))
            h0 = None if h0 is None else h0.repeat_interleave(G, 1)
            dht = None if dht is None else dht.repeat_interleave(G, 1) / G
        dht = None if dht is None else dht.float().contiguous()
        do = do.contiguous()
        dq, dk, dv, dg, dh0 = tuned(lambda cfg: _backward(q, k, v, g, do, ctx.scale, h0, dht, meta, cfg), q.device,
                                    "chunk_gla backward")
        if G > 1:
            def fold(x, dim):   # the sum over each kv head's G copies
                return x.unflatten(dim, (-1, G)).sum(dim + 1, dtype=torch.float32).to(x.dtype)
            dk, dv, dg, dh0 = fold(dk, 2), fold(dv, 2), fold(dg, 2), fold(dh0, 1)
        return dq, dk, dv, dg, None, (dh0 if h0 is not None else None), None, None


# ----------------------------------------------------------------------------- public API

def _check(q, k, v, g, initial_state, cu_seqlens):
    if q.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(v.shape)}")
    B, T, H, K = q.shape
    Hkv, V = k.shape[2] if k.dim() == 4 else 0, v.shape[-1]
    if (k.shape != (B, T, Hkv, K) or g.shape != k.shape or v.shape[:3] != k.shape[:3] or Hkv == 0
            or H % Hkv):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"g {tuple(g.shape)} (q [B, T, H, K]; k, g [B, T, Hkv, K] and v [B, T, Hkv, V] with "
                         f"Hkv dividing H)")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"q dtype {q.dtype} not supported (bf16, fp16, fp32)")
    if k.dtype != q.dtype or v.dtype != q.dtype or g.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}, g {g.dtype} "
                        "(k, v must equal q; g equal q or float32)")
    tensors = [q, k, v, g] + [x for x in (initial_state, cu_seqlens) if x is not None]
    if any(x.device != q.device for x in tensors):
        raise ValueError(f"all tensors must be on one device; got {[str(x.device) for x in tensors]}")
    if K not in HEAD_DIMS or V not in HEAD_DIMS:
        raise ValueError(f"head dims K={K}, V={V} not supported; each must be one of {HEAD_DIMS}")
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [N + 1]")
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (documents packed along T); got B={B}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != T or any(b <= a for a, b in zip(cu[:-1], cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0, strictly increase and end at T={T}; got {cu}")
        N = len(cu) - 1
    if initial_state is not None and initial_state.shape != (N, Hkv, K, V):
        raise ValueError(f"initial_state must be [N={N}, Hkv, K, V] = {(N, Hkv, K, V)}; got "
                         f"{tuple(initial_state.shape)}")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")


# In a compiled model this runs as is (a graph break): its launches are fused kernels already, and the checks
# read cu_seqlens on the host.
@torch.compiler.disable
def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Gated linear attention, chunked (training and prefill), with forward and backward.

    q: [B, T, H, K]; k, g: [B, T, Hkv, K]; v: [B, T, Hkv, V], Hkv dividing H (GQA: kv head j serves query
    heads j * H/Hkv ... (j + 1) * H/Hkv - 1, with one state per kv head; Hkv = H without GQA). g is the
    per-channel log-decay (<= 0), dtype of q or float32. q, k, v: bf16, fp16 or fp32; K, V in (16, 32, 64, 128).
    scale defaults to K ** -0.5. initial_state: [N, Hkv, K, V] (float32; N = B, or the number of documents with
    cu_seqlens). cu_seqlens: int32/int64 [N + 1], 0 = cu[0] < cu[1] < ... < cu[N] = T, B must be 1: documents
    packed along T; the state restarts at every document (from initial_state[n] if given).
    Returns o [B, T, H, V] (v's dtype) and the final state [N, Hkv, K, V] float32 (None unless
    output_final_state). Gradients flow to q, k, v, g and initial_state.
    """
    _check(q, k, v, g, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else float(scale)
    meta = _chunk_meta(cu_seqlens, B, T, q.device)
    flat = [x.reshape(1, B * T, *x.shape[2:]).contiguous() for x in (q, k, v, g)]
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = ChunkGLA.apply(*flat, scale, h0, output_final_state, meta)
    return o.view(B, T, H, -1), ht


def fused_recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Gated linear attention one step at a time, for decoding (T = 1 or a few tokens). Forward only:
    no autograd (raises if an input requires grad while grad mode is on; use chunk_gla for training).

    Shapes and arguments as chunk_gla: q [B, T, H, K]; k, g [B, T, Hkv, K]; v [B, T, Hkv, V]; initial_state
    [N, Hkv, K, V] float32. Returns o [B, T, H, V] (v's dtype) and the final state [N, Hkv, K, V] float32 (or None).
    """
    _check(q, k, v, g, initial_state, cu_seqlens)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, g, initial_state)):
        raise RuntimeError("fused_recurrent_gla has no backward; use chunk_gla, or call it under torch.no_grad()")
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    cu = (torch.arange(0, B * T + 1, T, dtype=torch.int32, device=q.device) if cu_seqlens is None
          else cu_seqlens.to(torch.int32))
    N = cu.numel() - 1
    q, k, v, g = (x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, g))
    o = v.new_empty(B * T, H, V)
    ht = q.new_empty(N, Hkv, K, V, dtype=torch.float32)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    BV = min(32, V)
    _recurrent_kernel[(V // BV, N * Hkv)](q, k, v, g, o, h0 if h0 is not None else ht, ht, cu, scale, H=Hkv,
                                          G=H // Hkv, K=K, V=V, BV=BV, HAS_IN=h0 is not None,
                                          STORE_OUT=output_final_state, num_warps=4)
    return o.view(B, T, H, V), (ht if output_final_state else None)


def decode_attention(q, k, v, bias, scale=None, splits=None):
    """Softmax attention of one new query per row over a cache (decode), split along the cache (flash-decoding).

    q [B, H, D]; k, v [B, S, Hkv, D] (the cache's layout, last dim contiguous; Hkv dividing H: GQA reads each kv
    head once for its H/Hkv query heads); bias [B, S] float32, added to the scores (0 for a visible slot, -inf
    for a hidden one; every row needs a visible slot). Each of `splits` programs per (row, kv head) covers a
    run of slots (default: enough to fill the GPU twice), and a weighted sum by each run's log-sum-exp joins
    them. Forward only. Returns [B, H, D] in q's dtype. Twin: model.attention with a dense mask (SDPA).
    """
    B, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape != (B, S, Hkv, D) or v.shape != k.shape or Hkv == 0 or H % Hkv or bias.shape != (B, S):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, bias "
                         f"{tuple(bias.shape)} (q [B, H, D]; k, v [B, S, Hkv, D] with Hkv dividing H; bias [B, S])")
    if D not in HEAD_DIMS or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"head dim {D} must be one of {HEAD_DIMS}, with contiguous last dims of k and v")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")
    G, BN = H // Hkv, 64
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        splits = max(1, 2 * sms // (B * Hkv))
    split = triton.cdiv(triton.cdiv(S, min(splits, triton.cdiv(S, BN))), BN) * BN   # slots per program
    NS = triton.cdiv(S, split)
    o = q.new_empty(B * Hkv, NS, G, D, dtype=torch.float32)
    lse = q.new_empty(B * Hkv, NS, G, dtype=torch.float32)
    scale = (D ** -0.5 if scale is None else float(scale)) * 1.4426950408889634     # log2(e): exp2 in the kernel
    _decode_attention_kernel[(B * Hkv, NS)](
        q.contiguous(), k, v, bias.float().contiguous(), o, lse, scale, S, split, *k.stride()[:3],
        *v.stride()[:3], H=Hkv, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BN=BN, NS=NS,
        PREC=_dot_types(q.dtype)[1], num_warps=4, num_stages=2)
    w = torch.softmax(lse * 0.6931471805599453, 1)                    # the splits' weights (log2 -> ln)
    return (w[..., None] * o).sum(1).view(B, H, D).to(q.dtype)


# ----------------------------------------------------------------------------- spike quantization

def spike_quant_torch(x, k=3.0, int8=False):
    """PyTorch twin of spike_quant (the same formula as model.spike_quant)."""
    x = x.float()
    vth = (x.abs().mean(-1, keepdim=True) / k).clamp(1e-5, 1e4)
    counts = torch.round(x / vth)
    return (counts.clamp(-127, 127).to(torch.int8) if int8 else counts), vth


def spike_quant(x, k=3.0, int8=False):
    """Spike counts of x [..., D]: vth = clamp(mean|x| / k, 1e-5, 1e4) per row (float32 [..., 1]),
    counts = round(x / vth), ties to even, float32 [..., D] (int8, clamped to [-127, 127], if int8).

    On CUDA this is torch.compile of spike_quant_torch (inductor's fused row reduction is as fast as a
    hand-written two-pass Triton kernel: BENCHMARKS.md); elsewhere it runs eagerly.
    """
    if not k > 0:
        raise ValueError(f"spike k={k} must be > 0")
    return (compiled(spike_quant_torch) if x.is_cuda else spike_quant_torch)(x, k, int8)


# ----------------------------------------------------------------------------- dispatch: which op takes a fast path

GLA_IMPL = "auto"    # "auto": the Triton GLA kernels on CUDA, model.py's references elsewhere; "torch" or "triton"
                     # forces one ("triton" on a CPU needs TRITON_INTERPRET=1: tests)
ATTN_IMPL = "auto"   # "auto": on CUDA flex_attention past 128 queries and decode_attention for one query, model.py's
                     # reference (SDPA with a dense mask) otherwise. "sdpa", "flex" or "triton" force one ("flex" on
                     # CPU runs flex_attention uncompiled, its dense reference; "triton" is the decode kernel for one
                     # query and the reference otherwise, on CPU under TRITON_INTERPRET=1: tests)


GEMV_SPLIT_BIAS = True   # a compiled batch-1 projection with a bias as a bias-free GEMV + the bias (use_split_bias);
                         # False: F.linear with the bias (the other half of an A/B: bench.py decode --split_bias)


def use_split_bias(x, bias):
    """F.linear(x, w) + bias in place of F.linear(x, w, bias), for x of one row in a compiled CUDA step without
    gradients (a decode step)? Under coordinate-descent tuning inductor writes a one-row matmul as its own tuned
    reduction, which reads the weights near the bandwidth, but it leaves a matmul with a bias (addmm) to cuBLAS,
    whose split-K GEMV with its separate reduce kernel is slow for the small q/k/v projections; the bias then
    fuses into the reduction's store."""
    return (GEMV_SPLIT_BIAS and bias is not None and x.is_cuda and torch.compiler.is_compiling()
            and not torch.is_grad_enabled() and x.numel() == x.shape[-1])


def on_gpu(q):
    """"auto" takes a kernel for q on CUDA at the head dims the kernels compile (HEAD_DIMS); a model of other head
    dims (a tiny test model) runs model.py's reference instead of stopping."""
    return q.is_cuda and q.shape[-1] in HEAD_DIMS


def use_gla(q):
    return GLA_IMPL == "triton" or (GLA_IMPL == "auto" and on_gpu(q))


def gla(q, k, v, g, initial_state=None, cu_seqlens=None):
    """model.gla on the kernels: the recurrent one for a few tokens without gradients (decode), else the chunked."""
    decode = q.shape[1] <= 4 and cu_seqlens is None and not torch.is_grad_enabled()
    fn = fused_recurrent_gla if decode else chunk_gla
    return fn(q, k, v, g, initial_state=initial_state, output_final_state=True, cu_seqlens=cu_seqlens)


def use_flex(q):
    """flex_attention for queries q [B, T, ...]? Compiled (CUDA), it needs more than one tile of 128 queries."""
    if q.is_cuda and q.shape[1] <= 128:
        return False
    return ATTN_IMPL == "flex" or (ATTN_IMPL == "auto" and on_gpu(q))


def use_band(q, window):
    """sliding_window_attention for these queries of one document (prefill or training, not decode)?"""
    return window is not None and q.shape[1] > 1 and use_flex(q)


def use_decode_attention(q):
    """decode_attention for q [B, 1, H, D] (one query per row over a cache, no gradient)?"""
    return (q.shape[1] == 1 and (ATTN_IMPL == "triton" or (ATTN_IMPL == "auto" and on_gpu(q)))
            and not (torch.is_grad_enabled() and q.requires_grad))


def masked_decode_attention(q, k, v, seen):
    """model.attention for one query per row: q [B, 1, H, D]; k, v [B, S, Hkv, D]; seen [B, S] bool."""
    bias = torch.zeros(seen.shape, device=q.device, dtype=torch.float32).masked_fill(~seen, float("-inf"))
    return decode_attention(q[:, 0], k, v, bias)[:, None]


# ----------------------------------------------------------------------------- flex_attention

# flex_attention's kernel_options on Hopper GPUs (sm90; other GPUs keep torch's defaults), by path, forward only
# ("fwd_" keys). "band" (sliding_window_attention, one document): 128 x 128 tiles, 8 warps, 3 stages, read through
# the tensor memory accelerator (TMA), faster than torch's defaults on the SWA prefill (BENCHMARKS.md). "mask" (any
# other block mask: packed documents, sinks, a cache): TMA with torch's tiles; its mask_mod reads position and
# document tensors, and the band's 3-stage tiles then need more shared memory than a Hopper SM has. Options that
# fail to compile on a device fall back to torch's defaults with one warning (with_fallback), so a tuning constant
# never stops a run. torch versions before 2.11 keep the defaults.
FLEX_OPTIONS = ({"band": dict(fwd_USE_TMA=True, fwd_BLOCK_M=128, fwd_BLOCK_N=128, fwd_num_warps=8, fwd_num_stages=3),
                 "mask": dict(fwd_USE_TMA=True)}
                if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 11) else {})
_swa_masks = {}      # block masks of one-document sliding-window attention, by shape and offset
_compiled = {}       # functions compiled for CUDA: flex_attention, the loss's passes, spike quantization


def compiled(fn):
    """torch.compile of fn, made once (recompiles once with dynamic shapes on a new size). Traced into a compiled
    graph (flex in a compiled block), fn itself: the graph compiles it anyway, and reading _compiled there would
    guard on its length, so every function compiled later (the loss's pass) would recompile the block."""
    if torch.compiler.is_compiling():
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def flex(q, k, v, block_mask, gqa, path="mask"):
    """flex_attention, compiled on CUDA (uncompiled elsewhere: a dense reference). q, k, v [B, H, L, D].
    path: "band" or "mask", which of FLEX_OPTIONS to try (on Hopper)."""
    from torch.nn.attention.flex_attention import flex_attention
    if not q.is_cuda:
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    opts = FLEX_OPTIONS.get(path) if torch.cuda.get_device_capability(q.device) == (9, 0) else None
    key = ("flex", str(q.device), path, q.dtype, q.shape[-1], gqa, q.requires_grad)
    return with_fallback(lambda o: compiled(flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=gqa,
                                                            kernel_options=o),
                         opts, key, f"flex_attention ({path} mask, head dim {q.shape[-1]}, {q.dtype})")


def ordered(d):
    """flex_attention's block lists from a tile map d [B, query tiles, key tiles] bool: per query tile how many key
    tiles, and which (ascending, padded after), for one head shared by all."""
    return (d.sum(-1, dtype=torch.int32)[:, None],
            torch.argsort((~d).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None])


def tile_bounds(x, tile):
    """Per tile of `tile` tokens the smallest and largest of x [B, L] (the last tile padded with its last value),
    and whether each tile is whole: ([B, n], [B, n], [n])."""
    B, L = x.shape
    n = -(-L // tile)
    x = torch.cat([x, x[:, -1:].expand(B, n * tile - L)], 1).view(B, n, tile)
    return x.amin(-1), x.amax(-1), torch.arange(1, n + 1, device=x.device) * tile <= L


def mask_tiles(q_pos, k_pos, q_doc, k_doc, window, tile=128):
    """Which tiles of model.visible's mask have some visible pair and which have all pairs visible, from each tile's
    range of positions and documents (no [T, S] mask, nothing compiled): (some, full) [B, T / tile, S / tile] bool.
    `some` may hold a tile with nothing visible (its mask_mod then hides every pair), `full` only a tile wholly
    visible: sink keys (doc -1) alone, or one document on both sides, all keys before every query and within the
    window."""
    (qlo, qhi, qwhole), (klo, khi, kwhole) = tile_bounds(q_pos, tile), tile_bounds(k_pos, tile)
    (qdlo, qdhi, _), (kdlo, kdhi, _) = tile_bounds(q_doc, tile), tile_bounds(k_doc, tile)
    qlo, qhi, qdlo, qdhi = (x[:, :, None] for x in (qlo, qhi, qdlo, qdhi))
    klo, khi, kdlo, kdhi = (x[:, None, :] for x in (klo, khi, kdlo, kdhi))
    some = (qdlo <= kdhi) & (kdlo <= qdhi) & (klo <= qhi)                 # documents overlap, a key not after
    full = (qdlo == qdhi) & (kdlo == kdhi) & (qdlo == kdlo) & (khi <= qlo)
    if window is not None:
        some, full = some & (qlo - khi <= window), full & (qhi - klo <= window)
    full = (full | (kdhi == -1)) & qwhole[:, None] & kwhole[None, :]
    return some | (kdlo == -1), full


def swa_block_mask(T, S, off, window, device, tile=128):
    """flex_attention's block mask for sliding-window attention of one document, made from the band's edges
    without a [T, S] mask: query i sees key j iff 0 <= i + off - j <= window. Tiles of 128 x 128 wholly inside
    the band skip the mask, tiles on its edges apply it, all others are skipped. Cached: every layer reuses it."""
    from torch.nn.attention.flex_attention import BlockMask
    key = (T, S, off, window, str(device))
    if key not in _swa_masks:
        if len(_swa_masks) >= 64:
            _swa_masks.clear()
        m = torch.arange(-(-T // tile), device=device)[:, None]              # query tiles
        n = torch.arange(-(-S // tile), device=device)[None]                 # key tiles
        q_lo, q_hi = m * tile + off, (m * tile + tile - 1).clamp(max=T - 1) + off
        k_lo, k_hi = n * tile, (n * tile + tile - 1).clamp(max=S - 1)
        some = (k_lo <= q_hi) & (k_hi >= q_lo - window)
        full = (k_hi <= q_lo) & (k_lo >= q_hi - window) & (m * tile + tile <= T) & (n * tile + tile <= S)

        shift = torch.tensor(off, device=device)

        def mask_mod(b, h, qi, ki):
            d = qi + shift - ki
            return (d >= 0) & (d <= window)
        _swa_masks[key] = BlockMask.from_kv_blocks(*ordered((some & ~full)[None]), *ordered(full[None]), tile,
                                                   mask_mod, seq_lengths=(T, S))
    return _swa_masks[key]


@torch.compiler.disable   # the block mask is cached on the host; compiled blocks call this as it is
def sliding_window_attention(q, k, v, q_start, k_start, window):
    """Sliding-window attention of one document on flex_attention: only the tiles in the band are computed, and
    GQA's kv heads are read in place (no copies). q [B, T, H, D] at positions q_start ...; k, v [B, S, Hkv, D]
    at positions k_start ..., ending with the last query. Returns [B, T, H, D]. Twin: model.attention."""
    bm = swa_block_mask(q.shape[1], k.shape[1], q_start - k_start, window, q.device)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return flex(q, k, v, bm, bool(q.shape[1] != k.shape[1]), "band").transpose(1, 2)


def masked_attention(q, k, v, q_pos, k_pos, q_doc, k_doc, window, visible):
    """model.attention on flex_attention: `visible` (model.visible) becomes a block mask, never a dense one: its
    tiles from mask_tiles, `visible` itself inside the partial ones. q [B, T, H, D]; k, v [B, S, Hkv, D]; pos/doc
    [B, T] / [B, S]. Returns [B, T, H, D]."""
    from torch.nn.attention.flex_attention import BlockMask

    if torch.compiler.is_compiling() and not torch.is_grad_enabled():
        return _masked_attention_outside(q, k, v, q_pos, k_pos, q_doc, k_doc, window, visible)
    B, T, H, _ = q.shape
    def mask_mod(b, h, qi, ki):
        return visible(q_pos[b, qi], k_pos[b, ki], q_doc[b, qi], k_doc[b, ki], window)
    some, full = mask_tiles(q_pos, k_pos, q_doc, k_doc, window)
    bm = BlockMask.from_kv_blocks(*ordered(some & ~full), *ordered(full), 128, mask_mod, seq_lengths=(T, k.shape[1]))
    gqa = bool(H != k.shape[2])
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return flex(q, k, v, bm, gqa).transpose(1, 2)


# A compiled inference block (prefill: lengths vary, so dynamic shapes) calls masked_attention as it is: the block mask
# built on the host and flex compiled on its own, as sliding_window_attention. Traced there, inductor (torch 2.11,
# CUDA) failed to lower flex_attention with a block mask built inside the graph at a dynamic length. Training keeps
# it in the compiled block (fixed lengths).
_masked_attention_outside = torch.compiler.disable(masked_attention)


@torch.compiler.disable   # slot order and offsets are read on the host: a compiled prefill runs this as is
def band_prefill(q, k, v, pos, doc, kv, window):
    """A prefill chunk of one document on the band, over a cache kv (a model.KVCache without sinks): the ring in
    position order (rows prefilled together hold the same positions), then the keys k, v [B, L, ...] at positions
    pos, doc [B, L], contiguous and right after the ring's: the T queries' own, the last T of them, possibly after
    keys not in the cache yet (a split sequence's ranks before, cp_attention). The keys are written to kv after.
    Twin: model.attention over the cache."""
    order = kv.pos[0].argsort()[:int((kv.pos[0] != kv.EMPTY).sum())]   # the filled slots (a count read on the host)
    ks, vs = kv.k[:, order], kv.v[:, order]
    first = int(pos[0, 0])
    o = sliding_window_attention(q, torch.cat([ks, k], 1), torch.cat([vs, v], 1), first + k.shape[1] - q.shape[1],
                                 first - ks.shape[1], window)
    kv.write(k, v, pos, doc)   # after the copies: these keys may overwrite ring slots still in reach
    return o


# ----------------------------------------------------------------------------- context parallelism
# One sequence split over the ranks of a torch.distributed group, rank r holding the r-th contiguous slice (any
# lengths): prefill, and training with the loss and gradients of one process. Packed documents may cross the slices'
# edges. Linear branches pass states (LASP-2); softmax branches fetch the keys before their slice (SWA: those within
# the window; full attention: all). Each rank runs the sink tokens itself (they are parameters, the same on every
# rank: n_sink more tokens a rank and no communication) and reads only its own copy of them, so the gradients summed
# over the ranks (cp_reduce_grads) count each rank's use of the sinks once. Under autograd every rank's backward must
# run the same collectives in the same order: each gather's outputs reach every rank's loss, even where a rank reads
# none of them (cp_linear's zero state, cp_before's empty selection on rank 0).

class CPGather(torch.autograd.Function):
    """all_gather of x (same shape on every rank) whose backward hands each rank the sum over ranks of its part's
    gradients: one reduce_scatter (torch.distributed.nn's all_gather is deprecated and emulates it on gloo)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(out, x.contiguous(), group=group)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        dx = torch.empty_like(grads[0])
        torch.distributed.reduce_scatter(dx, [g.contiguous() for g in grads], group=ctx.group)
        return dx, None


def cp_gather(x, group):
    """Every rank's x (same shape on all ranks), in rank order: one all_gather (a gradient goes back to its owner)."""
    return list(CPGather.apply(x, group))


@dataclass
class CPSlice:
    """This rank's part of a split sequence: cp_start makes it once a forward, every layer reads it. lengths: every
    rank's slice length; n_sink: the sink tokens each rank runs before its slice; docs: packed documents given;
    head [B]: how many of the slice's first tokens continue what enters it (the previous rank's last document; on
    rank 0 the sinks), T where no document starts in the slice, 0 where one starts at its first token; shift [B, T]:
    the positions a document begun on an earlier rank already took, added to its tokens here; prefix: the positions
    a cache held before this forward (an earlier round of a prefill in rounds: every rank holds the same cache)."""
    group: object
    rank: int
    lengths: list
    n_sink: int
    docs: bool
    head: torch.Tensor
    shift: torch.Tensor
    prefix: int = 0
    keys: dict = field(default_factory=dict)   # positions and documents of the keys cp_before gathers, by window

    @property
    def start(self):
        """Global index of this rank's first token (sinks not counted)."""
        return sum(self.lengths[:self.rank])


def cp_start(idx, group, n_sink, doc_ids=None, cache=None, input_pos=None):
    """This rank's CPSlice of a split sequence, idx [B, T] being its slice: one all_gather of every rank's slice
    length and, per row, its last document and how many tokens of it the slice holds. doc_ids [B, T]:
    this rank's slice (kernels.cp_slice) of the rows' non-decreasing document ids, numbered alike on every rank.
    n_sink: the sinks GPT.forward prepends. cache: the same on every rank (fresh, or the whole prefix after
    cp_share_cache); the slices follow what it holds. Refuses what the split cannot run first (GPT.forward's
    arguments)."""
    if input_pos is not None:
        raise NotImplementedError("a sequence split over ranks (cp_group) takes positions from the cache (prefill, "
                                  "or training with targets: cp_loss, cp_reduce_grads), not input_pos")
    T, rank = idx.shape[1], torch.distributed.get_rank(group)
    ar = torch.arange(T, device=idx.device)
    doc = torch.zeros_like(idx) if doc_ids is None else doc_ids.long()
    starts = F.pad(doc[:, 1:] != doc[:, :-1], (1, 0), value=True)                 # (B, T), the first token too
    last = torch.where(starts, ar, 0).amax(1)                                       # the last document's first token
    info = torch.stack(cp_gather(torch.stack([torch.full_like(last, T), doc[:, -1], T - last], 1), group))   # (n,B,3)
    d0, offset, alive = doc[:, 0], torch.zeros_like(last), torch.ones_like(last, dtype=torch.bool)
    for j in reversed(range(rank)):   # back over the ranks before while they end in this slice's first document
        alive = alive & (info[j, :, 1] == d0)                                       # (ids never decrease: then all
        offset = offset + torch.where(alive, info[j, :, 2], 0)                      # of rank j+1 was that document)
    cont = info[rank - 1, :, 1] == d0 if rank else torch.ones_like(alive)
    head = torch.where(cont, torch.where(starts & (ar > 0), ar, T).amin(1), 0)
    return CPSlice(group, rank, info[:, 0, 0].tolist(), n_sink, doc_ids is not None, head,
                   torch.where(ar < head[:, None], offset[:, None], 0), 0 if cache is None else cache.seen)


def cp_share_cache(cache, group):
    """Every rank of `group` takes the last rank's cache (model.Cache of the same shapes on all): after a round of a
    prefill in rounds, the last rank's holds the whole prefix, where the next round's slices start. One broadcast
    per buffer; cache.seen too."""
    src = torch.distributed.get_global_rank(group, torch.distributed.get_world_size(group) - 1)
    for b in cache.buffers():
        torch.distributed.broadcast(b, src, group=group)
    seen = torch.tensor([cache.seen], device=next(cache.buffers()).device)
    torch.distributed.broadcast(seen, src, group=group)
    cache.seen = int(seen)


@torch.no_grad()
def cp_prefill(model, cache, ids, group, chunk):
    """Feed ids [B, T] split over the ranks of `group` into `cache` (model.GPT and its cache, the same on every rank),
    in rounds of about n x chunk tokens (n ranks; at least n a round, cp_round_ends): each rank feeds its slice of a
    round (cp_slice) in one forward, so its activations are a slice's, not T / n tokens'; between rounds every rank
    takes the last rank's cache (cp_share_cache), where the next round's slices start. Returns the last slice's last
    logits [B, V]: on the last rank the whole prompt's, its cache then holding the prompt as one process's would."""
    ends = cp_round_ends(ids.shape[1], torch.distributed.get_world_size(group), chunk)
    for a, b in zip([0] + ends, ends):
        logits = model(cp_slice(ids[:, a:b], group), cache=cache, cp_group=group, last_only=True)[0]
        if b < ends[-1]:
            cp_share_cache(cache, group)
    return logits[:, -1]


def cp_round_ends(T, n, chunk):
    """Where cp_prefill's rounds of T tokens over n ranks end: as even as possible, each at most n x chunk tokens
    where that leaves every rank at least one."""
    rounds = max(1, min(-(-T // (n * chunk)), T // n))
    return [T * (r + 1) // rounds for r in range(rounds)]


def cp_slice(t, group):
    """This rank's contiguous slice of rows t [B, T] split over `group` (t itself for None): slice lengths differ by at
    most one, rank r's starting at T * r // n."""
    if group is None or t is None:
        return t
    r, n, T = torch.distributed.get_rank(group), torch.distributed.get_world_size(group), t.shape[1]
    return t[:, T * r // n:T * (r + 1) // n]


def cp_linear(q, k, v, g, cu_seqlens, cp, gla, h=None):
    """A linear branch (gla or la) over this rank's slice of a split sequence. q, k, g [B, T, H or Hkv, K],
    v [B, T, Hkv, V] (the sinks' tokens not included); cu_seqlens: the slice's documents in its flattened rows, each
    row starting one (model.GPT.forward's), or None; cp: cp_start's; gla: model.gla; h [1, Hkv, K, V]: the state the
    sinks leave, which starts every document (None: zero). Returns o [B, T, H, V] and the state after the slice
    [B, Hkv, K, V] (the whole prefix's).
    gla runs on the slice from zero states, or from h for a document starting in it: the first cp.head tokens of a
    row continue what enters the slice and start from zero. One all_gather of every rank's last state and its decay
    over the slice (zero where a document starts in it: that state owes nothing to what came before) gives the state
    entering this slice, S_in = decay_{r-1} S_in(r-1) + S_{r-1} from S_in(0) = h (zero without sinks), and the part
    of o it explains, scale * (q_t exp(b_t)) @ S_in for the head tokens, b_t the log-decay from the slice start to t:
    a correction, not a second gla."""
    rank, (B, T, Hkv), head = cp.rank, g.shape[:3], cp.head
    if cu_seqlens is None:   # one document a row: it starts from h where it starts at the slice's first token
        h0 = None if h is None else h.expand(B, -1, -1, -1) * (head == 0)[:, None, None, None]
        o, state = gla(q, k, v, g, initial_state=h0)
    else:
        first = cu_seqlens[:-1].long()                                             # documents' first tokens
        row = first // T
        fresh = (first % T > 0) | (head[row] == 0)
        h0 = None if h is None else h.expand(len(first), -1, -1, -1) * fresh[:, None, None, None]
        o, states = gla(*(t.reshape(1, -1, *t.shape[2:]) for t in (q, k, v, g)), initial_state=h0,
                        cu_seqlens=cu_seqlens)
        o, state = o.view(B, T, *o.shape[2:]), states[torch.bincount(row, minlength=B).cumsum(0) - 1]   # row's last
    b = g.cumsum(1)                                                                # (B, T, Hkv, K), <= 0
    decay = torch.where((head < T)[:, None, None], 0, b[:, -1].exp()).to(state.dtype)[..., None]   # (B, Hkv, K, 1)
    parts = cp_gather(torch.cat([state, decay], -1), cp.group)                     # (B, Hkv, K, V + 1)
    s_in = parts[rank][..., :-1] * 0   # zero, yet tied to the gather: rank 0's backward must reach its collective too
    if h is not None:
        s_in = s_in + h
    for p in parts[:rank]:
        s_in = p[..., -1:] * s_in + p[..., :-1]
    on = (torch.arange(T, device=q.device) < head[:, None])[:, :, None, None]     # (B, T, 1, 1) the head tokens
    w = b.exp() * on * q.shape[-1] ** -0.5                                         # (B, T, Hkv, K), head tokens
    qb = q.unflatten(2, (Hkv, -1)) * w[:, :, :, None]       # (B, T, Hkv, G, K) in b's dtype: one pass over q-sized data
    corr = torch.einsum("bthgk,bhkv->bthgv", qb, s_in.to(qb.dtype)).flatten(2, 3)  # GQA: head h // G
    return (o + corr).to(o.dtype), decay * s_in + state


def cp_before(x, window, cp):
    """What the ranks before this one hold of x [B, T, ...] (their slices, no sinks) that this slice's queries may
    see: the `window` tokens before it (SWA) or all of them (window None: full attention) -> [B, L, ...]. One
    all_gather: every rank sends its last `window` tokens (its whole slice for None), front-padded to one length P,
    so a slice may be shorter than the window; the selection is by global index, on rank 0 empty."""
    lengths, P = torch.tensor(cp.lengths), max(cp.lengths) if window is None else window
    parts = torch.cat(cp_gather(F.pad(x[:, -P:], (0, 0) * (x.dim() - 2) + (max(P - x.shape[1], 0), 0)), cp.group), 1)
    ends = lengths.cumsum(0)
    at = (ends[:, None] - P + torch.arange(P)).flatten()                           # global index of each slot
    lo = 0 if window is None else cp.start - window
    keep = (at >= (ends - lengths).repeat_interleave(P)) & (at >= lo) & (at < cp.start)   # not padding, in reach
    return parts[:, keep.nonzero().flatten().to(x.device)]


def cp_attention(q, k, v, pos, doc, window, kv, cp, attention):
    """model.Attention's softmax branch over this rank's slice of a split sequence: SWA, or full attention for window
    None. q, k after RoPE, [B, n_sink + T, ...]; pos/doc [B, n_sink + T] (doc None: one document, no sinks). The keys:
    the sinks' (this rank's copy), those of the ranks before in reach (cp_before; their positions and documents
    gathered once a forward), then the slice's own; `attention` (model.attention) masks by position and document. A
    cache kv (a model.KVCache, or None) gets them all, so the last rank's cache is the one a single process would
    hold; one holding a prefix (cp.prefix: an earlier round, the sinks among it) adds its keys in front.
    Memory of full attention: every rank receives all ranks' keys and values of the layer (ranks x longest slice x
    Hkv x 2 x head_dim, the whole sequence's, not 1/ranks of it) and autograd keeps those of the ranks before it for
    the backward; the last rank attends over the most keys (no ring, no load balancing)."""
    s = cp.n_sink
    doc = torch.zeros_like(pos) if doc is None else doc
    if window not in cp.keys:   # the same in every layer of this window
        cp.keys[window] = cp_before(torch.stack([pos[:, s:], doc[:, s:]], -1), window, cp).unbind(-1)
    (hpos, hdoc), (hk, hv) = cp.keys[window], cp_before(torch.cat([k[:, s:], v[:, s:]], -1), window, cp).chunk(2, -1)
    k, v, kpos, kdoc = (torch.cat([x[:, :s], h, x[:, s:]], 1) for x, h in ((k, hk), (v, hv), (pos, hpos), (doc, hdoc)))
    band = not s and not cp.docs and use_band(q, window) and (kv is None or kv.n_sink == 0)   # one document, no sinks
    if kv is not None and cp.prefix and (not band or hk.shape[1] < window):   # the window reaches into the prefix
        if band:   # the ring in position order, then the round's keys before the slice and its own
            return band_prefill(q, k, v, kpos, kdoc, kv, window)
        # the ring's slots in any order: the mask reads their positions (empty ones: never)
        ak, av, apos, adoc = (torch.cat([a, b], 1) for a, b in ((kv.k, k), (kv.v, v), (kv.pos, kpos), (kv.doc, kdoc)))
        kv.write(k, v, kpos, kdoc)
        return attention(q, ak, av, pos, apos, doc, adoc, window)
    if kv is not None:
        kv.write(k, v, kpos, kdoc)
    if band:   # the band's tiles alone
        start = int(pos[0, 0])
        return sliding_window_attention(q, k, v, start, start - hk.shape[1], window)
    return attention(q, k, v, pos, kpos, doc, kdoc, window)


def cp_loss(loss, n_tokens, group):
    """The split sequence's mean loss from this rank's: GPT.forward(targets=..., cp_group=group) returns the mean over
    the rank's own n_tokens targets (those != -100); the ranks' means weighted by their counts (one all_reduce). The
    value is the same on every rank, its gradient n_tokens / all tokens on this rank's loss only: backward on every
    rank, then cp_reduce_grads, gives one process's gradient of the whole sequence's mean."""
    n = torch.as_tensor(n_tokens, device=loss.device, dtype=loss.dtype)
    stats = torch.stack([loss.detach() * n, n])
    torch.distributed.all_reduce(stats, group=group)
    w = n / stats[1].clamp_min(1)
    return loss * w + (stats[0] / stats[1].clamp_min(1) - loss.detach() * w)


def cp_reduce_grads(model, group):
    """Sum every parameter's gradient over the ranks of a split sequence (after backward of cp_loss): a rank's
    backward gives the gradient through its own slice's computation (the gathers' backward has already sent home the
    gradients of the states and keys other ranks read), so the sequence's gradient is the sum, not the mean as over
    data-parallel replicas. A parameter without a gradient on this rank takes part with zeros."""
    work = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            work.append(torch.distributed.all_reduce(p.grad, group=group, async_op=True))
    for w in work:
        w.wait()


def cp_balance(probs, idx, shape, cp):
    """model.MoE's balance statistics over a split sequence: per expert the routed count and the router probabilities'
    sum, and the token count, over every rank's tokens with the sinks counted once (rank 0's; every rank runs them).
    probs [N, E], idx [N, k] of this rank's N = B * (n_sink + T) tokens, shape: the MoE input's [B, n_sink + T, C].
    One all_reduce; the sums' value is the whole sequence's, their gradient this rank's tokens' only (as cp_loss), so
    the gradients summed over the ranks (cp_reduce_grads) are one process's."""
    keep = torch.ones(shape[:2], dtype=torch.bool, device=probs.device)
    keep[:, :cp.n_sink if cp.rank else 0] = False
    keep = keep.flatten()
    E = probs.shape[-1]
    counts, psum = F.one_hot(idx[keep], E).sum((0, 1)).to(probs.dtype), probs[keep].sum(0)
    stats = torch.cat([counts, psum.detach(), psum.new_tensor([keep.sum()])])
    torch.distributed.all_reduce(stats, group=cp.group)
    return stats[:E], psum + (stats[E:2 * E] - psum.detach()), stats[-1]


def cp_init(rank, n, store, device, timeout=datetime.timedelta(minutes=30)):
    """Join rank `rank` of n processes that split sequences: NCCL with one GPU a rank (cuda:rank) for a CUDA device,
    gloo on the CPU (the ranks share its cores). store: a file path all ranks name alike (torch.distributed's file
    rendezvous). Returns (group, device): the world group and this rank's device. cp_close leaves it."""
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=n, timeout=timeout,
                                         device_id=torch.device(device) if cuda else None)   # barriers on its GPU
    return torch.distributed.group.WORLD, device


def cp_close():
    torch.distributed.destroy_process_group()


def _cp_rank(rank, n, store, device, timeout, fn, args):
    group, device = cp_init(rank, n, store, device, timeout)
    try:
        fn(group, device, *args)
    except BaseException as e:   # kept for cp_launch, which raises the first rank's error as it was
        with open(f"{store}.error{rank}", "wb") as f:
            pickle.dump((time.time(), e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}")), f)
        raise
    finally:
        cp_close()


def _picklable(e):
    try:
        pickle.loads(pickle.dumps(e))
        return True
    except Exception:
        return False


def cp_check_devices(n, device):
    """n ranks of a split sequence on `device` (cp_launch): on CUDA one GPU each, so n of them must be visible."""
    if n > 1 and device.startswith("cuda") and n > torch.cuda.device_count():
        raise ValueError(f"--cp {n} needs {n} GPUs, one a process; {torch.cuda.device_count()} visible "
                         f"(or --device cpu)")


def cp_launch(fn, n, device, *args, timeout=datetime.timedelta(minutes=30)):
    """Run fn(group, device, *args) in n new processes, one a rank of a split sequence (cp_init: one GPU each on
    CUDA), and wait for all of them. fn and args must pickle (torch.multiprocessing spawn). When a rank fails, the
    others are stopped (a collective would wait for it until `timeout`) and its exception is raised here as it was
    raised there (chained to the spawn error, which holds its traceback); when several fail, the first one's, since
    the others then fail in the collectives it left."""
    cp_check_devices(n, device)
    if device.startswith("cuda"):
        os.environ["NCCL_NVLS_ENABLE"] = "0"   # NVLink multicast off: it can put a shared host's GPUs out of service
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        spawn_log = logging.getLogger("torch.multiprocessing.spawn")
        level = spawn_log.level
        spawn_log.setLevel(logging.ERROR)   # not its warning for each rank it stops: the failed rank's error says why
        try:
            mp.spawn(_cp_rank, args=(n, store, device, timeout, fn, args), nprocs=n)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as spawned:
            errors = []
            for r in range(n):
                if os.path.exists(f"{store}.error{r}"):
                    with open(f"{store}.error{r}", "rb") as f:
                        errors.append(pickle.load(f))
            if not errors:
                raise
            raise min(errors, key=lambda te: te[0])[1] from spawned
        finally:
            spawn_log.setLevel(level)

# ----------------------------------------------------------------------------- the loss without full logits

def cross_entropy_chunk(logits, targets, grads):
    """Summed cross-entropy of logits [n, V] (rows with target -100 skipped) and, with grads, dL/dlogits =
    softmax - onehot in the logits' dtype (0 on skipped rows). Compiled on CUDA, this is two passes over
    the logits (the log-sum-exp, then the gradient), with no float32 copy of them."""
    valid = targets != -100
    t = torch.where(valid, targets, 0)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = x.logsumexp(-1)
    loss = torch.where(valid, lse - x.gather(1, t[:, None])[:, 0], 0.0).sum()
    if not grads:
        return loss, None
    p = (x - lse[:, None]).exp_()                                        # softmax
    if torch.compiler.is_compiling():   # the one-hot as a comparison: all of it one fused pass
        p = p - (torch.arange(x.shape[1], device=x.device) == t[:, None]).to(p.dtype)
    else:                               # eager: in place, no further [n, V] temporaries
        p[torch.arange(len(t), device=x.device), t] -= 1.0
    return loss, (p * valid[:, None]).to(logits.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits x [N, C] @ w [V, C]^T, `chunk` rows at a time. When gradients are wanted
    they are made in the forward pass, chunk by chunk (softmax - onehot is dL/dlogits): the [N, V] logits are
    never whole and never recomputed."""

    @staticmethod
    def forward(ctx, x, w, targets, chunk, grads):
        ct = torch.promote_types(x.dtype, torch.float32)                   # float64 stays float64 (tests)
        total = x.new_zeros((), dtype=ct)
        dx = torch.zeros_like(x) if grads else None
        dw = torch.zeros_like(w, dtype=ct) if grads else None
        xent = compiled(cross_entropy_chunk) if x.is_cuda else cross_entropy_chunk
        for i in range(0, x.shape[0], chunk):
            xc = x[i:i + chunk]
            loss, p = xent(xc @ w.T, targets[i:i + chunk], grads)          # logits (n, V) in x's dtype
            total += loss
            if grads:
                dx[i:i + chunk] = p @ w
                dw += p.T @ xc
        if grads:
            ctx.save_for_backward(dx, dw.to(w.dtype))
        return total

    @staticmethod
    def backward(ctx, grad):
        dx, dw = ctx.saved_tensors
        return dx * grad, dw * grad, None, None, None


def linear_cross_entropy(x, w, targets, chunk=8192):
    """Mean next-token loss of x [N, C] through the output layer w [V, C], `chunk` rows at a time (targets -100 are
    skipped): model.GPT's training loss without the [N, V] logits (128k x 152k of them would take 40 GB). Twin:
    F.cross_entropy of the full logits."""
    grads = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    total = LinearCrossEntropy.apply(x, w, targets, chunk, grads)
    return total / (targets != -100).sum().clamp_min(1)


# ----------------------------------------------------------------------------- how the blocks run: compiled, checkpointed

def compile_blocks(model, options=None):
    """torch.compile every block (prefill and training): norms, RoPE, gates and activations fuse around the
    matmuls. The GLA kernels and the sliding-window prefill (flex_attention) run as they are between the compiled
    pieces. options: inductor's options, e.g. an A/B in bench.py ttft --cse."""
    # Every block runs Block.forward, and dynamo counts compiled variants per code object (each piece between graph
    # breaks too) against one limit (default 8): the distinct blocks (mixers, MoE or dense FFN) times the ways a block
    # is called, with gradients or without (training, validation), on rows of one document or several (cu_seqlens
    # None or not), as its own class or FSDP2's subclass (a checkpointed block keeps its class inside the wrapper that
    # FSDP2 shards). Past the limit the rest would run eagerly.
    kinds = {(b.attn.linear, b.attn.softmax, type(b.mlp)) for b in model.blocks}
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), len(kinds) * 2 * 2 * 2))
    for block in model.blocks:
        block.compile(options=options)


ROW_PERSISTENT = 0   # > 0: a compiled CUDA decode step's reductions over a few rows (at most 8: the norms and spike
                     # counts of a batch-1 step) are persistent up to this width, the row read once into registers,
                     # where inductor's rule (up to 1024) loops over a 3584-wide row once per reduction with one
                     # block. Off: on an H200 neither 32768 nor 4096 sped a step up beyond the spread of one setting
                     # from process to process (BENCHMARKS.md; A/B: bench.py decode --row_persistent N)


def row_choices(width):
    """inductor's heuristics (torch._inductor.choices.InductorChoices, set with V.set_choices_handler) with
    ROW_PERSISTENT's rule: a reduction over at most 8 rows and at most `width` elements a row is persistent."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    class RowChoices(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction):
            known = V.graph.sizevars.statically_known_leq
            if known(features.numel, 8) and known(features.reduction_numel, width):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)
    return RowChoices()


def compile_decode(fn, device, gemv=True, options=None):
    """torch.compile of a decode step fn (model.GPT.forward with input_pos); on CUDA with CUDA graphs and, with
    gemv, inductor's coordinate-descent tuning, under which it writes the batch-1 matmuls (matrix-vector products)
    as its own tuned reduction kernels instead of cuBLAS's (they read the weights nearer the bandwidth:
    BENCHMARKS.md). The tuning makes the first compile slower; inductor's on-disk cache keeps its results. Every
    step gets decode_cse(group=True): a projection's input made by a transcendental op (SwiGLU's silu(gate) * up) or
    an RMSNorm written once (realize_gemv_inputs); a spiking or 8-bit step's spike counts of each input made once,
    and its one-row GEMVs of one input in one launch (faster: BENCHMARKS.md). options: more of inductor's options
    (torch.compile's), which win, e.g. for an A/B in bench.py decode --inductor or --group_rows false
    ({"post_grad_custom_pre_pass": None})."""
    options = {"post_grad_custom_pre_pass": decode_cse(group=True), **(options or {})}
    if device.type != "cuda":
        return torch.compile(fn, options=options)
    row_tickets(device)   # now: made in a CUDA graph's warm-up they would belong to the graph's memory pool
    step = torch.compile(fn, options={"triton.cudagraphs": True, "coordinate_descent_tuning": gemv, **options})
    if not ROW_PERSISTENT:
        return step
    from torch._inductor.virtualized import V
    choices = row_choices(ROW_PERSISTENT)

    def persistent_rows(*args, **kwargs):   # inductor compiles in the calling thread, at the first call
        with V.set_choices_handler(choices):
            return step(*args, **kwargs)
    return persistent_rows


REALIZE_GEMV_INPUTS = True   # compile_decode: a projection's input made by a transcendental op written once
                             # (realize_gemv_inputs); False: inlined into the GEMV as inductor leaves it (an A/B:
                             # bench.py decode --realize_gemv false)
REALIZE_GEMV_NORMS = True    # with it, an RMSNorm's output (rsqrt) too: the norm its own small kernel, not redone
                             # in every program of each GEMV that reads it (faster on an H200: BENCHMARKS.md; an
                             # A/B: bench.py decode --realize_norms false)


def decode_cse(group=False, cse=True, realize=None, norms=None):
    """An inductor graph pass (compile_decode's options={"post_grad_custom_pre_pass": decode_cse()}; also
    compile_blocks' for a prefill). realize (None: REALIZE_GEMV_INPUTS): first realize_gemv_inputs, with norms
    (None: REALIZE_GEMV_NORMS) of the RMSNorms' outputs too. cse: then merge the common subexpressions of a compiled
    step with torch._functorch's fx_graph_cse, which inductor runs on training graphs only. In a spiking step, the
    projections that read one input (q, k, v and the GLA gate's first factor; gate and up) each make that input's
    spike counts: the same ops on the same tensor, a one-row reduction each. Merged, the step makes them once.
    Mutations (the cache writes), random ops and outputs are left as they are. group: then the one-row GEMVs
    (gemv_row) of one input, format and shape become gemv_rows launches of 2-4 weights each (group_row_products). A
    graph without spike counts (aten.round, spike_counts) or one-row GEMVs, a float model's, is merged and grouped
    no further."""
    from torch._functorch.compile_utils import fx_graph_cse
    from torch._inductor.custom_graph_pass import CustomGraphPass

    marks = {torch.ops.aten.round.default, torch.ops.spikingbrain.gemv_row.default,
             torch.ops.spikingbrain.spike_counts.default}
    realize = REALIZE_GEMV_INPUTS if realize is None else realize
    norms = REALIZE_GEMV_NORMS if norms is None else norms

    class DecodeCSE(CustomGraphPass):
        def __call__(self, graph):
            if realize:
                realize_gemv_inputs(graph, norms)
            if not cse or not any(node.op == "call_function" and node.target in marks for node in graph.nodes):
                return
            new = fx_graph_cse(graph)
            if len(new.nodes) < len(graph.nodes):   # inductor holds this graph object: refill it in place
                for node in reversed(list(graph.nodes)):
                    graph.erase_node(node)
                graph.output(graph.graph_copy(new, {}))
            if group:
                group_row_products(graph)

        def uuid(self):   # inductor's cache key for the pass (and for ROW_PERSISTENT's rule, which it lacks)
            return f"spikingbrain.decode_cse.6.{group}.{cse}.{realize}.{norms}.{ROW_PERSISTENT}"
    return DecodeCSE()


def _gemv_operands(node):
    """(activation, weight) pairs a matmul node of a post-grad graph may multiply: aten.mm (x, w.T), aten.addmm
    (bias, x, w.T), and inductor's decomposition of a one-row mm under coordinate-descent tuning,
    sum(x.unsqueeze(2) * w.T.unsqueeze(0), dim=1), either order of the product. [] for any other node."""
    aten = torch.ops.aten
    if node.op != "call_function":
        return []
    if node.target is aten.mm.default:
        return [tuple(node.args[:2])]
    if node.target is aten.addmm.default:
        return [tuple(node.args[1:3])]
    if node.target is aten.sum.dim_IntList and isinstance(node.args[0], torch.fx.Node) and \
            node.args[0].target is aten.mul.Tensor and all(isinstance(a, torch.fx.Node) for a in node.args[0].args):
        a, b = node.args[0].args
        return [(a, b), (b, a)]
    return []


_aten = torch.ops.aten
VIEW_OPS = {_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.unsqueeze.default,
            _aten.squeeze.dim, _aten.permute.default, _aten.expand.default, _aten.t.default,
            torch.ops.prims.convert_element_type.default, _aten._to_copy.default}   # _view_base looks through them
TRANSCENDENTAL_OPS = {_aten.exp.default, _aten.exp2.default, _aten.expm1.default, _aten.log.default,
                      _aten.log1p.default, _aten.sigmoid.default, _aten.silu.default, _aten.tanh.default,
                      _aten.erf.default, _aten.gelu.default}   # what _made_with looks for
NORM_OPS = {_aten.rsqrt.default}   # an RMSNorm's 1 / sqrt(mean(x^2) + eps): realize_gemv_inputs' norms


def _view_base(node):
    """node with the views and dtype casts that lead to it stripped: the tensor they read."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in VIEW_OPS:
        node = node.args[0]
    return node


def _weight_input(node):
    """Is node a graph input (a weight), seen through views and casts? Not an MoE's experts gathered per row
    (expert_rows: aten.index of one): their SwiGLU product realized made the 76B's decode step slower
    (BENCHMARKS.md)."""
    node = _view_base(node)
    return isinstance(node, torch.fx.Node) and node.op in ("placeholder", "get_attr")


def _made_with(node, ops, depth=8):
    """Does the pointwise computation making node (up to depth ops back, through pointwise ops only) take one of
    ops (TRANSCENDENTAL_OPS: an exponential, a logarithm, a sigmoid or a tanh, as SiLU's x / (1 + exp(-x)) does)?"""
    if depth == 0 or not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target in ops:
        return True
    if not isinstance(node.target, torch._ops.OpOverload) or torch.Tag.pointwise not in node.target.tags:
        return False
    return any(_made_with(n, ops, depth - 1) for n in node.all_input_nodes)


def realize_gemv_inputs(graph, norms=False):
    """A projection's input made by pointwise ops that take a transcendental function (with norms: or an RMSNorm's
    rsqrt, NORM_OPS), written once: each such tensor of an FX post-grad graph (a matmul's activation,
    _gemv_operands, whose weight is a graph input, _weight_input) goes through prims.inductor_force_stride_order
    (its own strides), which makes inductor store it in a buffer. Left inlined, inductor computes it inside the
    GEMV's reduction again for every block of output rows: SwiGLU's silu(gate) * up, an exponential and a division
    per element, once per few rows of down_proj's weight. The buffer's pointwise kernel can fuse into the gate and
    up reduction before it. Returns the number of tensors realized."""
    from torch._inductor.inductor_prims import force_stride_order as force
    ops, done = TRANSCENDENTAL_OPS | NORM_OPS if norms else TRANSCENDENTAL_OPS, set()
    for node in list(graph.nodes):
        for x, w in _gemv_operands(node):
            base = _view_base(x)
            val = base.meta.get("val") if isinstance(base, torch.fx.Node) else None
            # symbolic strides (a dynamic inner dimension) would need the graph's size nodes: left as it is
            if (base in done or not _weight_input(w) or not _made_with(base, ops) or not isinstance(val, torch.Tensor)
                    or not all(isinstance(st, int) for st in val.stride())):
                continue
            with graph.inserting_after(base):
                kept = graph.call_function(force, (base, list(val.stride())))
            kept.meta["val"] = val
            base.replace_all_uses_with(kept, delete_user_cb=lambda user: user is not kept)
            done.add(base)
    return len(done)


def group_row_products(graph):
    """gemv_row calls of an FX graph that share their input row and vth, weight format, group size, output dtype,
    GEMV_ROW_CONFIGS shape and whether they have scales and a bias, replaced by gemv_rows calls of up to 4 weights
    (one launch where there were several), placed at the group's first call: a weight's, scale's or bias's pure
    producer made later (a view) moves before it; a group whose operands cannot stays as it is. Returns the number
    of gemv_rows calls made."""
    import operator

    one, rows = torch.ops.spikingbrain.gemv_row.default, torch.ops.spikingbrain.gemv_rows.default
    names = [a.name for a in one._schema.arguments]
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is one:
            a = {**dict(zip(names, node.args)), **node.kwargs}
            w = a["w"].meta["val"]
            shape = _row_key(a["fmt"], w.shape[1], w.shape[0], a["vth"] is not None)
            key = (a["x"], a["vth"], a.get("spike_k", 0.0), a["group_size"], a["fmt"], a["out_dtype"], w.dtype,
                   a["scales"] is None, a["bias"] is None, shape)
            groups.setdefault(key, []).append((node, a))

    def before(n, first, depth=3):   # n defined before first, or a pure op of such nodes moved there
        if order[n] < order[first]:
            return True
        if (depth == 0 or n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload)
                or n.target._schema.is_mutable or not all(before(i, first, depth - 1) for i in n.all_input_nodes)):
            return False
        first.prepend(n)   # a view of a weight's scales, made beside each call
        order[n] = order[first] - 0.5
        return True

    made = 0
    for members in groups.values():
        for part in (members[i:i + 4] for i in range(0, len(members), 4)):
            first = part[0][0]
            inputs = [n for _, a in part for n in (a["w"], a["scales"], a["bias"]) if isinstance(n, torch.fx.Node)]
            if len(part) < 2 or not all(before(n, first) for n in inputs):
                continue
            a0 = part[0][1]
            with graph.inserting_before(first):
                both = graph.call_function(rows, (a0["x"], [a["w"] for _, a in part], [a["scales"] for _, a in part],
                                                  a0["group_size"], a0["fmt"], a0["vth"],
                                                  [a["bias"] for _, a in part], a0["out_dtype"],
                                                  a0.get("spike_k", 0.0)))
                both.meta["val"] = [node.meta["val"] for node, _ in part]
                items = [graph.call_function(operator.getitem, (both, i)) for i in range(len(part))]
            for item, (node, _) in zip(items, part):   # after the insertions: they are placed before the first
                item.meta["val"] = node.meta["val"]
                node.replace_all_uses_with(item)
                graph.erase_node(node)
            made += 1
    return made


def checkpoint_blocks(model, n=None):
    """Per-block activation checkpointing of the first n blocks (all: None): keep each one's input, recompute its
    inside during backward (after compile_blocks, the wrapper recomputes the compiled block)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks[:n]):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)   # no randomness inside a block


def static_cache(cache):
    """Mark a cache's buffers static for a decode step compiled with CUDA graphs (compile_decode): the graphs read
    and write them in place, so they must keep their addresses."""
    for b in cache.buffers():
        torch._dynamo.mark_static_address(b)


# ----------------------------------------------------------------------------- device facts

# dense bf16 tensor-core peak FLOP/s (no sparsity), matched against torch.cuda.get_device_name: the MFU denominator
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12,
              "B200": 2250e12, "L40S": 362e12}


def peak_flops(device):
    """PEAK_FLOPS of a CUDA device (None for a CPU or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((PEAK_FLOPS[k] for k in sorted(PEAK_FLOPS, key=len, reverse=True) if k in name), None)


# ----------------------------------------------------------------------------- spike counts on 8-bit tensor cores

# W8ASpike multiplies small integers: spike counts by INT8 weights in groups of input channels. int8 x int8
# products summed in int32 are exact, so only the fp32 scaling rounds; int8 holds every count up to +-127 (FP8 e4m3
# only up to +-16). Tiles per CUDA capability, a starting point after the Triton matmul tutorial's, not yet swept
# on these shapes: two [BM, BN] accumulators live in registers (a piece's int32 sum, the fp32 total), so tiles stay
# at 128 x 128 for 8 warps. Other devices (keyed by type: "cpu" under the interpreter), and tiles that do not
# compile on one (with_fallback), take SPIKE_GEMM_SAFE.
SPIKE_GEMM_CONFIGS = {(9, 0): dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=4),
                      (8, 0): dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=3)}
SPIKE_GEMM_SAFE = dict(BM=64, BN=64, BK=64, GROUP_M=8, num_warps=4, num_stages=2)
SPIKE_GEMM_IMPL = "auto"   # "auto": spike_linear on CUDA (capability >= 8.0), spiking.py's float reference elsewhere;
                           # "torch" or "triton" forces one ("triton" on a CPU needs TRITON_INTERPRET=1: tests)


@triton.jit
def _spike_gemm_kernel(a, vth, b, scales, bias, c, M, N, K, GS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """One [BM, BN] tile of c = (sum_g scales[g] * (a[:, g] @ b[:, g]^T)) * vth (+ bias): a int8 [M, K] counts,
    b int8 [N, K] weights, scales fp32 [G, N] (transposed: a group's scales are contiguous), vth fp32 [M], groups
    of GS channels along K (the last one may be shorter: masked). K runs in pieces of BK channels that never
    cross a group (P per group; one with groups of 128): each piece's products sum exactly in int32, and the fp32
    total takes the piece times its group's scale. One flat loop over the pieces, so loads pipeline across groups.
    Tiles run in the tutorial's grouped order: GROUP_M row tiles sweep the column tiles together, so the weight
    tiles they share stay in L2."""
    P: tl.constexpr = (GS + BK - 1) // BK
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    first_m = (pid // (GROUP_M * n_n)) * GROUP_M
    rows_here = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % rows_here
    pid_n = (pid % (GROUP_M * n_n)) // rows_here
    rows, cols, o_k = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
    rm, rn = rows % M, cols % N                    # tiles past M or N wrap around: no masks; not stored
    pa = a + rm.to(tl.int64)[:, None] * K + o_k[None, :]
    pb = b + rn.to(tl.int64)[None, :] * K + o_k[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i in range(tl.cdiv(K, GS) * P):
        g = i // P
        lo = g * GS + (i % P) * BK
        m = lo + o_k < tl.minimum(g * GS + GS, K)
        part = tl.dot(tl.load(pa + lo, mask=m[None, :], other=0), tl.load(pb + lo, mask=m[:, None], other=0),
                      out_dtype=tl.int32)
        acc += part.to(tl.float32) * tl.load(scales + g * N + rn)[None, :]
    out = acc * tl.load(vth + rm)[:, None]
    if HAS_BIAS:
        out += tl.load(bias + rn).to(tl.float32)[None, :]
    tl.store(c + rows.to(tl.int64)[:, None] * N + cols[None, :], out.to(c.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


def _spike_gemm(a, v, b, st, bias, out, group_size, cfg):
    """Launch _spike_gemm_kernel with the tiles of cfg; pieces as wide as the group (BK at most cfg's, at least
    32: int8 tensor cores multiply 32 channels at a time)."""
    M, K = a.shape
    N = b.shape[0]
    BK = min(cfg["BK"], max(32, triton.next_power_of_2(group_size)))
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    _spike_gemm_kernel[grid](a, v, b, st, st if bias is None else bias, out, M, N, K, GS=group_size,
                             HAS_BIAS=bias is not None, BM=cfg["BM"], BN=cfg["BN"], BK=BK, GROUP_M=cfg["GROUP_M"],
                             num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _check_spike_linear(counts, vth, qweight, scales, group_size, bias):
    if counts.dim() != 2 or qweight.dim() != 2 or counts.shape[1] != qweight.shape[1]:
        raise ValueError(f"counts [M, K] and qweight [N, K] must share K; got {tuple(counts.shape)}, "
                         f"{tuple(qweight.shape)}")
    if counts.dtype != torch.int8 or qweight.dtype != torch.int8:
        raise TypeError(f"counts and qweight must be int8; got {counts.dtype}, {qweight.dtype}")
    (M, K), N = counts.shape, qweight.shape[0]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive int")
    G = triton.cdiv(K, group_size)
    if (vth.shape != (M, 1) or scales.shape != (N, G)
            or (bias is not None and bias.shape != (N,))):
        raise ValueError(f"shape mismatch: vth {tuple(vth.shape)}, scales {tuple(scales.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}; need vth [M={M}, 1], scales [N={N}, "
                         f"G={G}] (K={K} in groups of {group_size}), bias [N] or None")
    tensors = [counts, vth, qweight, scales] + ([bias] if bias is not None else [])
    if any(x.device != counts.device for x in tensors):
        raise ValueError(f"all tensors must be on one device; got {[str(x.device) for x in tensors]}")
    if counts.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")


@torch.compiler.disable   # compiled blocks reach it through the op _spike_gemm_into (w8aspike_linear)
def spike_linear(counts, vth, qweight, scales, group_size, bias=None, out_dtype=torch.float32, out=None):
    """W8ASpike's linear layer on 8-bit tensor cores (int8 x int8 tl.dot, int32 sums):
        y[m, n] = sum_g scales[n, g] * (sum_{k in group g} counts[m, k] * qweight[n, k]) * vth[m]  (+ bias[n]).

    counts int8 [M, K] (spike counts, e.g. spike_counts_int8); vth float32 [M, 1] (each row's threshold);
    qweight int8 [N, K]; scales [N, G], G = ceil(K / group_size): groups of group_size input channels, the last one
    shorter where group_size does not divide K (spiking.quantize_weight's layout); bias [N] or None.
    Returns [M, N] in out_dtype (written into `out` [M, N] when given).

    Exactness: the products of a group, in pieces of at most 128 channels (one piece per group of 128), sum in
    int32 without rounding, and each piece's sum converts to fp32 exactly (|sum| <= 128 * 128 * 127 < 2^24). Only
    the fp32 scaling rounds: per row, P pieces each times its scale and summed, then * vth, + bias, so
        |y - y_float64| <= (2P + 2) 2^-24 (sum_g |scales[n, g] * group sum| * vth[m] + |bias[n]|)
    before the cast to out_dtype (y_float64: spike_linear_torch on the same operands). Counts are int8, so
    nothing past +-127 reaches the kernel: w8aspike_linear finds the rows whose counts do not fit and sends them
    to the float path.
    Tiles: SPIKE_GEMM_CONFIGS for the device's capability, else (or where they do not compile) SPIKE_GEMM_SAFE.
    Twin: spike_linear_torch.
    """
    _check_spike_linear(counts, vth, qweight, scales, group_size, bias)
    (M, K), N = counts.shape, qweight.shape[0]
    out = counts.new_empty(M, N, dtype=out_dtype) if out is None else out
    if M == 0 or N == 0:
        return out
    a, b = counts.contiguous(), qweight.contiguous()
    v = vth.float().reshape(M).contiguous()
    st = scales.float().t().contiguous()                                      # [G, N]
    bias = None if bias is None else bias.contiguous()
    dev = counts.device
    opts = SPIKE_GEMM_CONFIGS.get(torch.cuda.get_device_capability(dev) if dev.type == "cuda" else dev.type)
    return with_fallback(lambda cfg: _spike_gemm(a, v, b, st, bias, out, min(group_size, K), cfg or SPIKE_GEMM_SAFE),
                         opts, ("spike_gemm", str(dev)), "spike_linear")


def spike_linear_torch(counts, vth, qweight, scales, group_size, bias=None, out_dtype=torch.float32):
    """PyTorch twin of spike_linear, in float64, group by group: the same formula over the same operands. counts
    may hold any integer values (float or int: the float path of rows whose counts do not fit int8)."""
    y = int8_gemv_torch(counts, qweight, scales, group_size) * vth.double()   # the same group sums, then * vth
    return (y if bias is None else y + bias.double()).to(out_dtype)


def spike_counts_int8_torch(x, k=3.0):
    """Spike counts of x [M, D] for spike_linear: int8 counts clamped to [-127, 127], vth float32 [M, 1] (the
    formula of spike_quant), and wide bool [M]: the rows where the clamp changed a count."""
    counts, vth = spike_quant_torch(x, k)
    return counts.clamp(-127, 127).to(torch.int8), vth, counts.abs().amax(-1) > 127


def spike_counts_int8(x, k=3.0):
    """spike_counts_int8_torch, compiled on CUDA: one pass over x gives the counts, the thresholds and the wide
    rows (the max over each row fuses into the quantization)."""
    if not k > 0:
        raise ValueError(f"spike k={k} must be > 0")
    return (compiled(spike_counts_int8_torch) if x.is_cuda else spike_counts_int8_torch)(x, k)


def use_spike_gemm(x):
    """spike_linear for a W8ASpikeLinear's input x [..., in]? Inference only: no gradient flows through it."""
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return SPIKE_GEMM_IMPL == "triton" or (SPIKE_GEMM_IMPL == "auto" and x.is_cuda
                                           and torch.cuda.get_device_capability(x.device) >= (8, 0))


def w8aspike_linear(x, qweight, scales, group_size, k=3.0, bias=None):
    """spiking.W8ASpikeLinear's forward on spike_linear: x [..., K] -> spike counts at threshold parameter k ->
    [..., N] in x's dtype (qweight int8 [N, K], scales [N, G], bias [N] or None, as spike_linear).

    Counts past +-127 are not saturated: a row holding one (a channel beyond 127.5 thresholds, 42.5 x the row's
    mean |x| at k = 3) is found by a max over its counts, fused into the quantization pass, and recomputed by the
    float path (spike_linear_torch on its exact counts, float64); the other rows come from the kernel. The price
    is one read of a flag on the host per call. In a compiled block the quantization stays in the graph (inductor
    fuses it into the pass before it) and the kernel and the host read run inside the ops _spike_gemm_into and
    _w8_wide_rows, so the block is one graph.
    """
    x2 = x.reshape(-1, x.shape[-1])
    counts, vth, wide = spike_counts_int8(x2, k)
    y = x2.new_empty(x2.shape[0], qweight.shape[0])
    _spike_gemm_into(y, counts, vth, qweight, scales, group_size, bias)
    _w8_wide_rows(y, wide, x2, qweight, scales, group_size, float(k), bias)
    return y.view(*x.shape[:-1], -1)


@torch.library.custom_op("spikingbrain::spike_gemm_into", mutates_args=("out",))
def _spike_gemm_into(out: torch.Tensor, counts: torch.Tensor, vth: torch.Tensor, qweight: torch.Tensor,
                     scales: torch.Tensor, group_size: int, bias: Optional[torch.Tensor]) -> None:
    """spike_linear into out [M, N] (its dtype): one op to a compiled graph, the launch and its tile fallback
    running as they are."""
    spike_linear(counts, vth, qweight, scales, group_size, bias, out.dtype, out)


@_spike_gemm_into.register_fake
def _(out, counts, vth, qweight, scales, group_size, bias):
    return None


@torch.library.custom_op("spikingbrain::w8_wide_rows", mutates_args=("y",))
def _w8_wide_rows(y: torch.Tensor, wide: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  group_size: int, k: float, bias: Optional[torch.Tensor]) -> None:
    """w8aspike_linear's rows holding a count past +-127 (wide [M] bool), recomputed in place in y [M, N] by the
    float path on their exact counts: one op, so that its host read of `wide` does not break a compiled graph."""
    if wide.any():
        rows = wide.nonzero()[:, 0]
        c, v = spike_quant_torch(x[rows], k)
        y[rows] = spike_linear_torch(c, v, qweight, scales, group_size, bias, out_dtype=y.dtype)


@_w8_wide_rows.register_fake
def _(y, wide, x, qweight, scales, group_size, k, bias):
    return None


# ----------------------------------------------------------------------------- spike counts on FP8 tensor cores

# The same layer on FP8 (e4m3) tensor cores through torch._scaled_mm: the counts as e4m3 with each row's vth as its
# scale, the weight as e4m3 per output channel with its scale (spiking.FP8SpikeLinear). e4m3 holds every integer up
# to +-16 exactly and 3 mantissa bits beyond (17 -> 16, 100 -> 96, up to 448), so unlike the int8 route the counts
# past 16 are rounded; in exchange torch._scaled_mm's FP8 GEMMs outrun the int8 kernel on Hopper (BENCHMARKS.md).
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max   # 448, e4m3's largest: rows with a count past it take the float path
SPIKE_FP8_IMPL = "auto"    # "auto": spike_linear_fp8 on CUDA (capability >= 8.9, torch._scaled_mm present), the float
                           # reference elsewhere; "torch" forces the reference; "scaled_mm" forces torch._scaled_mm (on
                           # a CPU torch's own kernel, float32 out: tests)


def fp8_counts_torch(x, k=3.0):
    """Spike counts of x [M, K] for spike_linear_fp8: counts as e4m3 [M, K] (clamped to +-448 before the cast,
    so the cast never saturates silently), vth float32 [M, 1] (spike_quant's formula) and wide bool [M]: the rows
    holding a count past 448."""
    counts, vth = spike_quant_torch(x, k)
    return counts.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), vth, counts.abs().amax(-1) > FP8_MAX


def fp8_fits(K, N):
    """Does torch._scaled_mm take an [M, K] x [K, N] product? K and N multiples of 16 (its stride rules); any M."""
    return K % 16 == 0 and N % 16 == 0


def e4m3_counts(counts, top=None):
    """The counts FP8 layers multiply, float32: rounded to e4m3 (exact up to +-16), but a row holding a count past
    FP8_MAX keeps its exact counts (spiking.fp8_counts' rule, which spiking.py keeps for use without this file).
    top: each row's largest |count| [..., 1] where the caller has it (gemv_counts_torch), else read from counts."""
    wide = (counts.abs().amax(-1, keepdim=True) if top is None else top) > FP8_MAX
    return torch.where(wide, counts, counts.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float())


def spike_linear_fp8_torch(x, weight, scale, k=3.0, bias=None, out_dtype=torch.float64):
    """Float64 twin of spike_linear_fp8 on the same quantized operands: the counts rounded to e4m3 (a row holding a
    count past 448 keeps its exact counts, as spike_linear_fp8's float path), the e4m3 weight times its scale.
    x [M, K]; weight float8_e4m3fn [N, K]; scale [N]; bias [N] or None. -> [M, N] in out_dtype."""
    counts, vth = spike_quant_torch(x, k)
    c = e4m3_counts(counts).double()
    y = (c @ (weight.double() * scale.double()[:, None]).T) * vth.double()
    return (y if bias is None else y + bias.double()).to(out_dtype)


def spike_linear_fp8(x, weight, scale, k=3.0, bias=None):
    """spiking.FP8SpikeLinear's forward on FP8 tensor cores: x [..., K] -> [..., N] in x's dtype,
        y[m, n] = (sum_k e4m3(counts[m, k]) * weight[n, k]) * vth[m] * scale[n]  (+ bias[n]),
    counts, vth = spike_quant(x, k); weight float8_e4m3fn [N, K], scale float32 [N], bias [N] or None.

    torch._scaled_mm with row-wise scales (scale_a = vth [M, 1], scale_b = scale [1, N]); out bf16 on CUDA (row-wise
    scaling takes no other there), float32 on a CPU; bias added in float32 after. Exactness: every product of two
    e4m3 values is exact in fp32 (4 + 4 significant bits), so against spike_linear_fp8_torch (float64, the same
    e4m3 operands) only the accumulation and scaling round: |y - y64| <= (K + 3) 2^-24 (sum_k |c w| vth scale +
    |bias|) with fp32 sums (a CPU: tested), plus half an ulp of the output dtype (bf16: 2^-9 |y|, before bias). On
    a GPU the tensor cores' accumulation takes the place of 2^-24 (Hopper's FP8 MMA keeps fewer bits within one
    instruction), the bf16 output's 2^-9 dominating it. Counts up to +-16 are exact in e4m3, so there y64 is the
    product of the exact counts; a count c past 16 is rounded to 4 significant bits, |e4m3(c) - c| <= |c| / 16,
    which moves y by at most sum over those counts of |c w| / 16 * vth * scale. A row with a count past 448
    (e4m3's largest) is recomputed by the twin on its exact counts (one read of a flag on the host per call, as
    w8aspike_linear, inside the op _fp8_wide_rows: a compiled block keeps the quantization and the GEMM in its graph,
    the quantization fused into the pass before it). A shape torch._scaled_mm does not take (K or N not a multiple
    of 16) runs the twin in float64: slower, never an error. A decode step (a few rows) takes fp8_gemv instead
    (FP8SpikeLinear's dispatch): no host sync at all.
    """
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    if not fp8_fits(K, N) or x2.shape[0] == 0:
        return spike_linear_fp8_torch(x2, weight, scale, k, bias, x.dtype).view(*x.shape[:-1], N)
    if not k > 0:
        raise ValueError(f"spike k={k} must be > 0")
    a, vth, wide = (compiled(fp8_counts_torch) if x.is_cuda else fp8_counts_torch)(x2, k)   # traced: inlined
    y = torch._scaled_mm(a, weight.t(), scale_a=vth, scale_b=scale.float().view(1, N),
                         out_dtype=torch.bfloat16 if x.is_cuda else torch.float32)
    y = (y if bias is None else y.float() + bias.float()).to(x.dtype)
    _fp8_wide_rows(y, wide, x2, weight.view(torch.uint8), scale, float(k), bias)
    return y.view(*x.shape[:-1], N)


@torch.library.custom_op("spikingbrain::fp8_wide_rows", mutates_args=("y",))
def _fp8_wide_rows(y: torch.Tensor, wide: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   k: float, bias: Optional[torch.Tensor]) -> None:
    """spike_linear_fp8's rows holding a count past FP8_MAX (wide [M] bool), recomputed in place in y [M, N] by the
    twin on their exact counts: one op, so that its host read of `wide` does not break a compiled graph. weight:
    the e4m3 bytes as uint8 (an op's arguments take no float8 dtype on every torch)."""
    if wide.any():
        rows = wide.nonzero()[:, 0]
        y[rows] = spike_linear_fp8_torch(x[rows], weight.view(torch.float8_e4m3fn), scale, k, bias, y.dtype)


@_fp8_wide_rows.register_fake
def _(y, wide, x, weight, scale, k, bias):
    return None


def use_spike_fp8(x):
    """spike_linear_fp8 for an FP8SpikeLinear's input x [..., in]? Inference only: no gradient flows through it."""
    if (torch.is_grad_enabled() and x.requires_grad) or not hasattr(torch, "_scaled_mm"):
        return False
    return SPIKE_FP8_IMPL == "scaled_mm" or (SPIKE_FP8_IMPL == "auto" and x.is_cuda
                                             and torch.cuda.get_device_capability(x.device) >= (8, 9))


# ----------------------------------------------------------------------------- mixture of experts

MOE_IMPL = "auto"    # "auto": moe_experts in training on a GPU where torch._grouped_mm has its kernel (Hopper, bf16)
                     # and in a compiled decode step (moe_gathered); model.py's per-expert loop elsewhere and in eager
                     # inference (the loop reads only the routed experts' weights, in place). "grouped" or "torch"
                     # forces one ("grouped" in float32/64 takes grouped_mm's masked form: tests, graph capture on CPU)


def compute_dtype(x):
    """The dtype x's matmuls run in: autocast's when it is on (bf16-mixed), else x's."""
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


def has_grouped_mm(device, dtype, *widths):
    """Does torch._grouped_mm serve these matrices (rows `widths` wide), with no host sync, eager and compiled? Only in
    bf16 (its shape function for torch.compile takes nothing else) with every row 16-byte aligned, on a CPU (a loop
    over the groups on the host) or a Hopper GPU (sm90): other GPUs take its fallback, which copies the group offsets
    to the host and loops over them, and on Blackwell (sm100) empty groups get nonzero weight gradients
    (pytorch#172439)."""
    if dtype != torch.bfloat16 or any(w * dtype.itemsize % 16 for w in widths):
        return False
    if device.type == "cuda":
        return not torch.version.hip and torch.cuda.get_device_capability(device)[0] == 9
    return device.type == "cpu"


def groups_of(offs, R):
    """The group of each of R rows, from offs (int32 [G], the end of each group's rows): (R,) int32."""
    return torch.searchsorted(offs, torch.arange(R, device=offs.device, dtype=offs.dtype), right=True)


def grouped_mm(a, b, offs):
    """Rows of a [R, K] in G groups (offs int32 [G]: each group's end, offs[-1] = R) times their group's b [G, K, M]:
    [R, M]. Where torch._grouped_mm does not serve (has_grouped_mm), every row goes through every group's matrix and
    keeps its own group's product: G times the FLOPs, no host sync (float32/64 tests, graph capture on CPU)."""
    if has_grouped_mm(a.device, a.dtype, a.shape[-1], b.shape[-1]):
        return torch._grouped_mm(a, b, offs=offs)
    group, out = groups_of(offs, a.shape[0]), a.new_zeros(a.shape[0], b.shape[-1])
    for g in range(b.shape[0]):
        out = torch.where((group == g)[:, None], a @ b[g], out)
    return out


def grouped_mm_t(a, b, offs):
    """Each group's a^T b over its rows: a [R, M], b [R, K] in the groups of offs -> [G, M, K] (zero for an empty
    group): the weight gradient of grouped_mm."""
    if has_grouped_mm(a.device, a.dtype, a.shape[-1], b.shape[-1]):
        return torch._grouped_mm(a.t(), b, offs=offs)
    group = groups_of(offs, a.shape[0])
    return torch.stack([torch.where((group == g)[:, None], a, 0).t() @ b for g in range(offs.shape[0])])


class GroupedLinear(torch.autograd.Function):
    """Rows of a [R, K] in the groups of offs, each through its expert's weight: w [E, M, K] (ExpertLinear's, as it
    is) -> [R, M]. Autograd keeps a and the weight itself (FSDP frees it and gathers it again), no copy of it."""

    @staticmethod
    def forward(ctx, a, offs, w):
        ctx.save_for_backward(a, offs, w)
        return grouped_mm(a, w.transpose(1, 2), offs)

    @staticmethod
    def backward(ctx, dy):
        a, offs, w = ctx.saved_tensors
        dy = dy.contiguous()   # torch._grouped_mm takes row- or column-major matrices only
        da = grouped_mm(dy, w, offs) if ctx.needs_input_grad[0] else None
        return da, None, grouped_mm_t(dy, a, offs)


MOE_GATHER_TOKENS = 16   # a compiled inference step of at most this many tokens takes moe_gathered


def moe_decode_traced(n_tokens):
    """Is this a compiled inference step (a decode step traced by torch.compile) of at most MOE_GATHER_TOKENS?"""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled() and n_tokens <= MOE_GATHER_TOKENS


def use_moe(x, experts):
    """moe_experts for x [N, C] through model.MoE's experts (a ModuleDict of gate_proj, up_proj, down_proj)? In a
    compiled decode step (moe_decode_traced: the loop's nonzero would give the graph a new shape per step), over
    float or 8-bit stacked experts (spiking's W8ASpike and FP8 swaps), and in training on a GPU with grouped GEMMs,
    over float stacked weights with one spike_k. Never where a hook watches an expert (spike statistics and
    calibration read each expert's own rows)."""
    ps = [experts[n] for n in ("gate_proj", "up_proj", "down_proj")]
    if any(p._forward_hooks or p._forward_pre_hooks for p in ps):
        return False
    if MOE_IMPL != "torch" and moe_decode_traced(x.shape[0]):
        return True
    I = ps[0].out_features
    if MOE_IMPL == "torch" or MOE_IMPL == "auto" and not (
            x.is_cuda and torch.is_grad_enabled() and has_grouped_mm(x.device, compute_dtype(x), x.shape[-1], I)):
        return False
    k = ps[0].spike_k
    return all(isinstance(getattr(p, "weight", None), torch.nn.Parameter) and p.spike_k == k for p in ps)


def _spike(x, k):
    """model.spike: x -> counts * vth forward, identity gradient."""
    counts, vth = spike_quant_torch(x, k)
    return x + ((counts * vth).to(x.dtype) - x).detach()


def moe_experts(x, w, idx, experts):
    """model.MoE's routed experts without a host sync: out[n] = sum_j w[n, j] * expert_{idx[n, j]}(x[n]).

    x [N, C]; w [N, k] float32 (or wider), the router weights of the chosen experts; idx [N, k] int64, their ids;
    experts: model.MoE.experts (gate_proj, up_proj weights [E, I, C], down_proj [E, C, I]). The N * k (token,
    expert) rows are sorted by expert once, and each projection is one grouped GEMM over its stacked weight
    (GroupedLinear). Every expert is in the graph (a zero gradient without rows): all FSDP ranks reduce the same
    set. In a compiled decode step (moe_decode_traced) moe_gathered instead, also over 8-bit experts. Returns
    [N, C] in x's dtype. Twin: model.MoE.routed.
    """
    N, k = idx.shape
    if x.dim() != 2 or w.shape != idx.shape or x.shape[0] != N:
        raise ValueError(f"moe_experts: x [N, C], w and idx [N, k]; got {tuple(x.shape)}, {tuple(w.shape)}, "
                         f"{tuple(idx.shape)}")
    if moe_decode_traced(N):
        return moe_gathered(x, w, idx, experts)
    E = experts["gate_proj"].weight.shape[0]
    dt, spike_k = compute_dtype(x), experts["gate_proj"].spike_k
    flat = idx.flatten()                                                 # (N*k,) expert of each (token, slot) row
    order = flat.argsort(stable=True)                                    # rows by expert, tokens in order within
    offs = torch.searchsorted(flat[order], torch.arange(E, device=x.device), right=True).int()   # (E,) group ends
    xs = x[order // k]                                                   # (N*k, C) sorted rows
    if spike_k is not None:   # per row: the same spikes as each expert's projections make of its own rows
        xs = _spike(xs, spike_k)
    gate, up, down = (experts[n].weight.to(dt) for n in ("gate_proj", "up_proj", "down_proj"))
    xs = xs.to(dt)
    h = F.silu(GroupedLinear.apply(xs, offs, gate)) * GroupedLinear.apply(xs, offs, up)   # (N*k, I)
    if spike_k is not None:
        h = _spike(h, spike_k)
    y = GroupedLinear.apply(h, offs, down) * w.flatten()[order, None]   # (N*k, C), weighted in float32 (or wider)
    return y[order.argsort()].view(N, k, -1).sum(1).to(x.dtype)          # back in (token, slot) order


def moe_gathered(x, w, idx, experts):
    """moe_experts for the few rows of a compiled decode step: each (token, slot) row times its own expert's
    weights, indexed where they lie (expert_rows). Inductor fuses the index into its reduction, so a step reads the
    chosen experts' weights once, with no sort, no host sync and the same shapes every step (CUDA graphs); eager,
    W[idx] would copy those weights, so only traced steps take it (moe_decode_traced). x [N, C], w [N, k], idx
    [N, k] -> [N, C] in x's dtype. Twin: model.MoE.routed."""
    (N, k), C = idx.shape, x.shape[-1]
    flat, dt = idx.flatten(), compute_dtype(x)
    xs = x[:, None].expand(N, k, C).reshape(N * k, C).to(dt)            # (N*k, C): row j of token n
    h = F.silu(expert_rows(experts["gate_proj"], xs, flat)) * expert_rows(experts["up_proj"], xs, flat)
    y = expert_rows(experts["down_proj"], h.to(dt), flat) * w.flatten()[:, None]   # (N*k, C)
    return y.view(N, k, C).sum(1).to(x.dtype)


def expert_rows(p, xs, flat):
    """Row r of xs [R, in] through expert flat[r] of the stacked projection p -> [R, out], float32 or wider, the
    weights indexed in place: model.ExpertLinear (float, spiking with its spike_k; products and sums in float32 or
    wider), spiking's W8ASpike swap (int8 groups; spike counts, or weight-only without spike_k) or FP8 swap (e4m3,
    a scale per output channel) as gemv8_fused with a matrix per row."""
    if isinstance(getattr(p, "weight", None), torch.Tensor):
        xs = xs if p.spike_k is None else _spike(xs, p.spike_k)
        ct = torch.promote_types(xs.dtype, torch.float32)
        return (xs.to(ct)[:, None, :] * p.weight[flat].to(ct)).sum(-1)
    fp8 = hasattr(p, "fp8_weight")
    q, s, gs = (p.fp8_weight, p.scales[..., None], p.in_features) if fp8 else (p.qweight, p.scales, p.group_size)
    if p.spike_k is None:
        return gemv8_fused(xs, q[flat], s[flat], gs)
    return gemv8_fused_spikes(xs, q[flat], s[flat], gs, p.spike_k, fp8)


# ----------------------------------------------------------------------------- decode with INT8 weights

# Batch-small decode reads every weight once per token, so 8-bit weights halve the bytes of bf16 ones. Each program
# owns BN output channels and one run of K (a split); it loads the INT8 tile, converts it in registers and
# multiplies it with the rows of x padded to 16 (tl.dot's smallest tile: the spare rows cost no weight reads). A
# tile never crosses a scale group, so the group's scale multiplies the tile's fp32 sum once. Settings per CUDA
# capability: on sm90 the best of `bench.py gemv`'s sweep over a 7B block's projections, int8 weight-only and
# W8ASpike together (benchmarks/LOG.md); other devices ("cpu" under the interpreter), and settings that do not
# compile on one (with_fallback), take INT8_GEMV_SAFE.
INT8_GEMV_CONFIGS = {(9, 0): dict(BN=32, BK=128, num_warps=4, num_stages=4),
                     (8, 0): dict(BN=64, BK=128, num_warps=4, num_stages=3)}
INT8_GEMV_SAFE = dict(BN=32, BK=64, num_warps=4, num_stages=2)
INT8_GEMV_MAX_ROWS = 8     # decode: up to 8 rows (batch x new tokens); more take dequantize + F.linear
INT8_GEMV_IMPL = "auto"    # "auto": int8_gemv on CUDA (capability >= 8.0) for <= INT8_GEMV_MAX_ROWS rows, the
                           # dequantized float path elsewhere; "torch" or "triton" forces one (tests)


@triton.jit
def _e4m3_to_f32(b):
    """e4m3 bits (uint8, from quantize_weight_fp8: never the NaNs 0x7f, 0xff) -> fp32 by integer ops, for GPUs whose
    Triton has no e4m3 conversion (capability < 8.9): the sign and the 7 exponent-mantissa bits placed in an fp16
    (exponent bias 15) are the value times 2^-8, e4m3's subnormals (exponent 0) fp16 subnormals; both steps exact."""
    h = b.to(tl.int32)
    h = ((h & 0x80) << 8) | ((h & 0x7F) << 7)
    return h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _gemv8_kernel(x, w, scales, out, M, N, K, G, tiles_per_split, GS: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, FMT: tl.constexpr, HALF: tl.constexpr,
                  DOT: tl.constexpr):
    """Partial sums out[split, :, cols] = sum over the split's K tiles of scales[g, cols] * (x[:, tile] @
    w[cols, tile]^T): x [M, K] (float), w 8-bit [N, K], scales fp32 [N, G] (as stored: no transposed copy per
    call; they are 1/GS of the weight bytes), out fp32 [splits, M, N]. BK divides GS (or K is one group): each
    tile lies in group lo // GS. FMT: 0 int8 weights; 1 e4m3 bits (uint8) converted by Triton; 2 the same bits
    decoded by _e4m3_to_f32. Weights convert to x's dtype exactly (|q| <= 127, or e4m3's 4 significant bits), so
    every product is exact in fp32. HALF: x is fp16 and the weights become fp16 (int8 by integer operations: the
    bits of 1024 + (q + 128), less 1152; conversion instructions are a quarter of their rate), tl.dot in fp16 with
    fp32 sums. DOT false: no tensor cores, so no rows padded to 16 (BM the rows' power of two): the tile's products
    in fp32 on the CUDA cores, summed over K by tl.sum (HALF then only means x is fp16, converted exactly)."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows, cols, o_k = tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
    rn = cols % N                                  # columns past N wrap around: no masks; not stored
    px = x + rows[:, None] * K + o_k[None, :]
    pw = w + rn.to(tl.int64)[None, :] * K + o_k[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    first = pid_s * tiles_per_split
    for t in range(first, tl.minimum(first + tiles_per_split, tl.cdiv(K, BK))):
        lo = t * BK
        m = lo + o_k < K
        xt = tl.load(px + lo, mask=(rows < M)[:, None] & m[None, :], other=0.0)
        wt = tl.load(pw + lo, mask=m[:, None], other=0)
        if FMT == 1:
            wt = wt.to(tl.float8e4nv, bitcast=True)
        elif FMT == 2:
            wt = _e4m3_to_f32(wt)
        if not DOT:
            part = tl.sum(xt.to(tl.float32)[:, :, None] * wt.to(tl.float32)[None, :, :], axis=1)
        elif HALF:
            if FMT == 0:
                wt = ((wt.to(tl.uint8, bitcast=True).to(tl.uint16) ^ 0x80) | 0x6400).to(tl.float16, bitcast=True)
                wt = wt - 1152.0
            part = tl.dot(xt, wt.to(tl.float16))
        else:
            part = tl.dot(xt, wt.to(xt.dtype), input_precision=PREC)
        acc += part * tl.load(scales + rn * G + lo // GS)[None, :]
    tl.store(out + pid_s * M * N + rows[:, None] * N + cols[None, :], acc,
             mask=(rows < M)[:, None] & (cols < N)[None, :])


def _int8_gemv_tile_k(K, group_size, bk):
    """The widest K tile, at most bk and at least 16 (tl.dot's), that never crosses a group: a power of two
    dividing group_size, or any width when K is one group. None when no tile fits (groups of e.g. 24 channels)."""
    if group_size >= K:
        return min(bk, max(16, triton.next_power_of_2(K)))
    t = bk
    while t >= 16 and group_size % t:
        t //= 2
    return t if t >= 16 else None


def int8_gemv_fits(K, group_size):
    """Can int8_gemv take a layer of K input channels in groups of group_size?"""
    return _int8_gemv_tile_k(K, min(group_size, K), 16) is not None


def _gemv8(x, w, st, out, group_size, splits, cfg, fmt=0, prec=None):
    """Launch _gemv8_kernel with cfg's settings (BN, BK, num_warps, num_stages; DOT, default True: tl.dot on rows
    padded to 16, False: CUDA-core products) and weight format fmt (0: int8, 1 or 2: e4m3 bits); splits along K
    (None: enough programs to fill the GPU twice, cut to whole tiles); the partial sums of the splits add up in fp32
    afterwards. prec: tl.dot's input precision (None: "ieee" for fp32 x, no tf32 rounding of the activations); an
    fp16 x takes the kernel's HALF path."""
    M, K = x.shape
    N = w.shape[0]
    BK = _int8_gemv_tile_k(K, group_size, cfg["BK"])
    n_tiles, k_tiles = triton.cdiv(N, cfg["BN"]), triton.cdiv(K, BK)
    if splits is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        splits = triton.cdiv(2 * sms, n_tiles)
    per = triton.cdiv(k_tiles, max(1, min(splits, k_tiles)))      # K tiles per split
    S = triton.cdiv(k_tiles, per)
    part = out if S == 1 else x.new_empty(S, M, N, dtype=torch.float32)
    prec = prec or ("ieee" if x.dtype == torch.float32 else "tf32")
    dot = cfg.get("DOT", True)
    _gemv8_kernel[(n_tiles, S)](x, w, st, part, M, N, K, st.shape[1], per, GS=group_size,
                                BM=16 if dot else triton.next_power_of_2(M), BN=cfg["BN"], BK=BK, PREC=prec, FMT=fmt,
                                HALF=x.dtype == torch.float16, DOT=dot, num_warps=cfg["num_warps"],
                                num_stages=cfg["num_stages"])
    if S > 1:
        torch.sum(part, 0, out=out)
    return out


def _check_int8_gemv(x, qweight, scales, group_size, bias):
    if x.dim() != 2 or qweight.dim() != 2 or x.shape[1] != qweight.shape[1]:
        raise ValueError(f"x [M, K] and qweight [N, K] must share K; got {tuple(x.shape)}, {tuple(qweight.shape)}")
    if qweight.dtype != torch.int8 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"need float x (fp32, fp16, bf16) and int8 qweight; got {x.dtype}, {qweight.dtype}")
    (M, K), N = x.shape, qweight.shape[0]
    if M > 16:
        raise ValueError(f"int8_gemv multiplies at most 16 rows (decode); got {M}: use a GEMM")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive int")
    if not int8_gemv_fits(K, group_size):
        raise ValueError(f"groups of {group_size} channels (K={K}) do not hold whole K tiles of 16: use the "
                         f"dequantized path")
    G = triton.cdiv(K, group_size)
    if scales.shape != (N, G) or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"shape mismatch: scales {tuple(scales.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}; need scales [N={N}, G={G}] (K={K} in "
                         f"groups of {group_size}), bias [N] or None")
    tensors = [x, qweight, scales] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"all tensors must be on one device; got {[str(t.device) for t in tensors]}")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")


@torch.library.custom_op("spikingbrain::gemv8", mutates_args=())
def _gemv8_op(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, group_size: int, splits: Optional[int],
              fp8: bool = False, tf32: bool = False, half: bool = False) -> torch.Tensor:
    """_gemv8_kernel as one opaque op, so that a compiled decode step (CUDA graphs) keeps it inside its graph instead
    of breaking around every projection: x [M, K] @ (w * scales per group).T, fp32 [M, N]. w int8, or (fp8) e4m3
    bits as uint8 with one group of K (scales [N, 1]). tf32: fp32 x whose values tf32 holds exactly (fp8_gemv's and
    w8aspike_gemv's count rows) multiply in tf32 on CUDA; otherwise fp32 x multiplies in full fp32. half: x's values
    are exact in fp16 too (count rows below 65504): the kernel's HALF path (fp16 tl.dot, the weights converted by
    integer operations), or tf32 where that does not compile on this device (gemv_half_failed)."""
    (M, K), N = x.shape, w.shape[0]
    out = x.new_empty(M, N, dtype=torch.float32)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    xc, wc, st, dev = x.contiguous(), w.contiguous(), scales.float().contiguous(), x.device   # st [N, G]
    name, table = ("fp8_gemv", FP8_GEMV_CONFIGS) if fp8 else ("int8_gemv", INT8_GEMV_CONFIGS)
    opts = table.get(torch.cuda.get_device_capability(dev) if dev.type == "cuda" else dev.type)
    g, prec = min(group_size, K), "tf32" if tf32 and dev.type == "cuda" else None

    def run(fmt, xs):
        return with_fallback(lambda cfg: _gemv8(xs, wc, st, out, g, splits, cfg or INT8_GEMV_SAFE, fmt, prec), opts,
                             (name, str(dev), xs.dtype), name)

    def run_rows(fmt):   # the rows in fp16 where asked, unless that path does not compile here: then as given
        if not half or str(dev) in gemv_half_failed:
            return run(fmt, xc)
        try:
            return run(fmt, xc.half())
        except triton.compiler.errors.CompilationError as e:
            gemv_half_failed.add(str(dev))
            warnings.warn(f"{name}: the fp16 path does not compile on {dev} ({str(e).strip()[:160]}); multiplying "
                          f"the count rows in tf32 instead", stacklevel=3)
            return run(fmt, xc)
    fmt = _fp8_gemv_format(dev) if fp8 else 0
    if fmt != 1:
        return run_rows(fmt)
    try:
        return run_rows(1)
    except triton.compiler.errors.CompilationError as e:   # this Triton has no e4m3 conversion here after all
        fp8_format_failed.add(str(dev))
        warnings.warn(f"fp8_gemv: Triton's e4m3 conversion does not compile on {dev} ({str(e).strip()[:160]}); "
                      f"decoding the e4m3 bits with integer operations instead", stacklevel=2)
        return run_rows(2)


gemv_half_failed = set()   # devices where _gemv8_kernel's HALF path did not compile


@_gemv8_op.register_fake
def _(x, w, scales, group_size, splits, fp8=False, tf32=False, half=False):
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32)


# ----------------------------------------------------------------------------- batch-1 decode: one row on CUDA cores

# A decode step of one token multiplies one row by every weight matrix. tl.dot pads that row to 16 and splits small
# matrices along K (partial sums added by a second kernel); here each program owns BN whole weight rows, streams
# them once in tiles of BK, converts each byte in registers and multiplies it with the row on the CUDA cores (a few
# operations a byte: e4m3 weights keep up with their reads; int8 ones with a scale per group of 128 less so, which is
# why weight-only int8's tall shapes stay on tl.dot), then applies vth, the bias and the cast itself: one launch a
# projection, the count or activation row read as it is (fp32 counts, bf16 activations), no copy. BN shrinks on a
# small matrix so that its programs still fill the GPU; SPLIT > 1 splits K among that many programs instead (the tall
# shapes: wider blocks, each reading less of the row; the last program of a block adds the parts, no second pass).
# The split needs row_tickets made before the launch (compile_decode makes them): without them a launch runs whole.
# Settings per CUDA capability, weight kind ("int8": weight-only, "w8aspike": int8 times spike counts, "e4m3": FP8
# times counts, "float") and shape ("wide": N > K, the MLP's gate and up; "tall": the rest), the best of
# `bench.py gemv`'s sweep on a 7B block (benchmarks/LOG.md); a missing entry, another device, and a setting that
# does not compile there (with_fallback) take GEMV_ROW_SAFE. More rows than GEMV_ROW_MAX_ROWS take the tl.dot
# kernel above, whose weight tile serves all of them.
GEMV_ROW_CONFIGS = {(9, 0): {("e4m3", "wide"): dict(BN=16, BK=256, num_warps=4, num_stages=3, ACC2D=False),
                             ("e4m3", "tall"): dict(BN=16, BK=512, num_warps=4, num_stages=3, ACC2D=False, SPLIT=4),
                             ("int8", "wide"): dict(BN=16, BK=128, num_warps=4, num_stages=3),
                             ("int8", "tall"): None,
                             ("w8aspike", "wide"): dict(BN=16, BK=128, num_warps=4, num_stages=3),
                             ("w8aspike", "tall"): dict(BN=16, BK=256, num_warps=4, num_stages=3, ACC2D=False,
                                                        SPLIT=8)}}
GEMV_ROW_SAFE = dict(BN=8, BK=128, num_warps=4, num_stages=2)
GEMV_ROW_MAX_ROWS = 1     # rows (tokens a step) that take _gemv_row_kernel; 0 turns it off (A/B: bench.py decode)
# A setting's DOT=True (counts times int8 or e4m3 weights by tl.dot, _row_dot) is swept by bench.py gemv but set
# nowhere: on an H200 it read the weights at 0.43-0.73x the CUDA-core loop's rate, by shape (BENCHMARKS.md)
GEMV_ROW_SPIKES = False   # True: a spiking layer's one-row GEMV makes x's counts in its kernel (gemv_row spike_k),
                          # no one-block reduction before it, but each program's extra pass over the row and division
                          # per element cost more (BENCHMARKS.md; bench.py decode --row_spikes true)
W_INT8, W_E4M3, W_E4M3_BITS, W_FLOAT = 0, 1, 2, 3   # _gemv_row_kernel's weight formats (FMT)


@triton.jit
def _e4m3_bits_to_f32(b):
    """e4m3 bits (uint8, never the NaNs) -> fp32 by integer operations alone: the sign and the 7 exponent-mantissa
    bits placed in an fp32 (exponent bias 127) are the value times 2^-120 (e4m3's subnormals fp32 subnormals), so
    one exact multiply by 2^120 restores it."""
    h = b.to(tl.uint8, bitcast=True).to(tl.uint32)
    h = ((h & 0x80) << 24) | ((h & 0x7F) << 20)
    return h.to(tl.float32, bitcast=True) * 1.329227995784916e36   # 2^120


@triton.jit
def _gemv_row_kernel(x, w, scales, vth, bias, out, part, tickets, N, K, G, k, GS: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, FMT: tl.constexpr, EVEN_K: tl.constexpr, ACC2D: tl.constexpr,
                     MAGIC: tl.constexpr, GROUPED: tl.constexpr, HAS_VTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SPIKE: tl.constexpr, DOT: tl.constexpr, SPLIT: tl.constexpr):
    """x [M, K] times one weight w [N, K] (_gemv_row_block's formula): program (pid // M) owns BN output channels,
    row m = pid % M (a second row of the same channels runs beside the first, so its weight tile comes from L2);
    program_id(1) the part of K (SPLIT parts)."""
    pid = tl.program_id(0)
    M = tl.num_programs(0) // tl.cdiv(N, BN)
    _gemv_row_block(x, w, scales, vth, bias, out, part, tickets, pid, tl.program_id(1), N, K, G, k, pid % M, pid // M,
                    GS, BN, BK, FMT, EVEN_K, ACC2D, MAGIC, GROUPED, HAS_VTH, HAS_BIAS, SPIKE, DOT, SPLIT)


@triton.jit
def _gemv_rows_kernel(x, vth, w0, s0, b0, o0, N0, w1, s1, b1, o1, N1, w2, s2, b2, o2, N2, w3, s3, b3, o3, N3, part,
                      tickets, K, G, k, GS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FMT: tl.constexpr,
                      EVEN_K: tl.constexpr, ACC2D: tl.constexpr, MAGIC: tl.constexpr, GROUPED: tl.constexpr,
                      HAS_VTH: tl.constexpr, HAS_BIAS: tl.constexpr, SPIKE: tl.constexpr, DOT: tl.constexpr,
                      SPLIT: tl.constexpr):
    """x [M, K] times up to four weights wi [Ni, K] (unused ones: Ni = 0) in one launch: matrix i's blocks of BN
    channels follow matrix i-1's; each block as _gemv_row_kernel's."""
    pid, sk = tl.program_id(0), tl.program_id(1)
    n0, n1, n2 = tl.cdiv(N0, BN), tl.cdiv(N1, BN), tl.cdiv(N2, BN)
    M = tl.num_programs(0) // (n0 + n1 + n2 + tl.cdiv(N3, BN))
    row, cb = pid % M, pid // M
    if cb < n0:
        _gemv_row_block(x, w0, s0, vth, b0, o0, part, tickets, pid, sk, N0, K, G, k, row, cb, GS, BN, BK, FMT, EVEN_K,
                        ACC2D, MAGIC, GROUPED, HAS_VTH, HAS_BIAS, SPIKE, DOT, SPLIT)
    elif cb < n0 + n1:
        _gemv_row_block(x, w1, s1, vth, b1, o1, part, tickets, pid, sk, N1, K, G, k, row, cb - n0, GS, BN, BK, FMT,
                        EVEN_K, ACC2D, MAGIC, GROUPED, HAS_VTH, HAS_BIAS, SPIKE, DOT, SPLIT)
    elif cb < n0 + n1 + n2:
        _gemv_row_block(x, w2, s2, vth, b2, o2, part, tickets, pid, sk, N2, K, G, k, row, cb - n0 - n1, GS, BN, BK,
                        FMT, EVEN_K, ACC2D, MAGIC, GROUPED, HAS_VTH, HAS_BIAS, SPIKE, DOT, SPLIT)
    else:
        _gemv_row_block(x, w3, s3, vth, b3, o3, part, tickets, pid, sk, N3, K, G, k, row, cb - n0 - n1 - n2, GS, BN,
                        BK, FMT, EVEN_K, ACC2D, MAGIC, GROUPED, HAS_VTH, HAS_BIAS, SPIKE, DOT, SPLIT)


@triton.jit
def _rint(v):
    """v rounded to the nearest integer, ties to even (torch.round), for |v| < 2^22: adding 1.5 * 2^23 leaves no
    fraction bits in fp32, and fp32 adds round to nearest even."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _e4m3_round(c):
    """Integers |c| <= 448 (fp32) rounded to e4m3's 4 significant bits, ties to even (torch's .to(float8_e4m3fn)),
    by integer operations on the fp32 bits (no FP8 type needed; every such integer is an e4m3 normal): the 20 low
    mantissa bits rounded off."""
    b = c.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _row_vth(px, o, K, k, BLOCK: tl.constexpr, E4M3: tl.constexpr):
    """A row's spike threshold vth = clamp(mean|x| / k, 1e-5, 1e4) in fp32 (IEEE division), read in tiles of BLOCK
    (px: the first tile's pointers, o: arange(BLOCK)), and whether (E4M3) its largest count round(max|x| / vth)
    passes 448, where e4m3_counts keeps the row's counts exact (without E4M3: False). Returns (vth, wide)."""
    sa = tl.zeros([BLOCK], dtype=tl.float32)
    mx = tl.zeros([BLOCK], dtype=tl.float32)
    for lo in range(0, K, BLOCK):
        xa = tl.abs(tl.load(px + lo, mask=lo + o < K, other=0.0).to(tl.float32))
        sa += xa
        if E4M3:   # dividing by vth and rounding keep the order of |x|: the largest count comes from max|x|
            mx = tl.maximum(mx, xa)
    v = tl.minimum(tl.maximum(tl.div_rn(tl.div_rn(tl.sum(sa, 0), K * 1.0), k), 1e-5), 1e4)
    return v, _rint(tl.div_rn(tl.max(mx, 0), v)) > 448.0


@triton.jit
def _counts(x, v, wide, E4M3: tl.constexpr):
    """Spike counts round(x / vth) of fp32 x (IEEE division, ties to even); E4M3: rounded to e4m3 as e4m3_counts,
    unless the row is wide (_row_vth)."""
    c = _rint(tl.div_rn(x, v))
    if E4M3:
        c = tl.where(wide, c, _e4m3_round(tl.minimum(tl.maximum(c, -448.0), 448.0)))
    return c


@triton.jit
def _row_tile(px, pw, lo, o_k, K, EVEN_K: tl.constexpr):
    """The tile at lo of a row (fp32 [BK]) and of a weight's rows ([BN, BK], as stored); past K (not EVEN_K): 0."""
    if EVEN_K:
        xt, wt = tl.load(px + lo), tl.load(pw + lo)
    else:
        m = lo + o_k < K
        xt, wt = tl.load(px + lo, mask=m, other=0.0), tl.load(pw + lo, mask=m[None, :], other=0)
    return xt.to(tl.float32), wt


@triton.jit
def _row_dot(x, w, scales, row, rn, k0, k1, K, G, GS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             FMT: tl.constexpr, EVEN_K: tl.constexpr, GROUPED: tl.constexpr):
    """_gemv_row_block's sums (scales applied, not vth) for spike counts x[row, k0:k1] on the tensor cores: each
    tile of the row converted to the weight's 8-bit type (FMT W_INT8: int8; W_E4M3: e4m3) and set as column 0 of a [BK, 16]
    tile, the other 15 columns zero (tl.dot's narrowest), times the weight tile [BN, BK] as it is read: no
    conversion per weight byte. int8: int32 sums, exact (127 * 127 * BK < 2^24, so exact in fp32 too), times the
    group's scale in fp32; e4m3: each 32 products summed by the tensor cores (Hopper's FP8 MMA keeps fewer bits than
    fp32 there), those sums in fp32. Returns (sums [BN], slow): slow when a value of the row differs from its
    8-bit conversion (a count past 127 or 448, a fraction): then the caller's CUDA-core loop redoes the row."""
    o_k, j = tl.arange(0, BK), tl.arange(0, 16)
    pw = w + rn.to(tl.int64)[:, None] * K + o_k[None, :]
    px = x + row * K + o_k
    acc = tl.zeros([BN, 16], dtype=tl.float32)
    off = tl.zeros([BK], dtype=tl.float32)
    for lo in range(k0, k1, BK):
        xt, wt = _row_tile(px, pw, lo, o_k, K, EVEN_K)
        col0 = j[None, :] == 0
        if FMT == 0:
            x8 = tl.minimum(tl.maximum(xt, -128.0), 127.0).to(tl.int8)
            xd = tl.where(col0, x8[:, None], tl.zeros([BK, 16], dtype=tl.int8))
            d = tl.dot(wt, xd).to(tl.float32)       # [BN, 16]: column 0 the tile's sums
        else:   # Hopper's FP8 MMA sums with fewer bits than fp32: each instruction's 32 products go to fp32 at once
            x8 = tl.minimum(tl.maximum(xt, -448.0), 448.0).to(tl.float8e4nv)
            xd = tl.where(col0, x8.to(tl.uint8, bitcast=True)[:, None], tl.zeros([BK, 16], dtype=tl.uint8))
            d = tl.dot(wt.to(tl.float8e4nv, bitcast=True), xd.to(tl.float8e4nv, bitcast=True),
                       max_num_imprecise_acc=32)
        off = tl.maximum(off, tl.abs(xt - x8.to(tl.float32)))
        if GROUPED:
            acc += d * tl.load(scales + rn * G + lo // GS)[:, None]
        else:
            acc += d
    y = tl.sum(acc, axis=1)
    if not GROUPED:
        y = y * tl.load(scales + rn)
    return y, tl.max(off, 0) > 0


@triton.jit
def _row_out(acc, out, vth, bias, row, N, cols, rn, v, HAS_VTH: tl.constexpr, HAS_BIAS: tl.constexpr,
             SPIKE: tl.constexpr):
    """_gemv_row_block's end: the sums acc [BN] of channels cols times vth (v: the kernel's own, SPIKE), plus the
    bias, stored in out's dtype."""
    if SPIKE:
        acc = acc * v
    elif HAS_VTH:
        acc = acc * tl.load(vth + row)
    if HAS_BIAS:
        acc = acc + tl.load(bias + rn).to(tl.float32)
    tl.store(out + row * N + cols, acc.to(out.dtype.element_ty), mask=cols < N)


@triton.jit
def _gemv_row_block(x, w, scales, vth, bias, out, part, tickets, tile, sk, N, K, G, k, row, cb, GS: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, FMT: tl.constexpr, EVEN_K: tl.constexpr, ACC2D: tl.constexpr,
                    MAGIC: tl.constexpr, GROUPED: tl.constexpr, HAS_VTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SPIKE: tl.constexpr, DOT: tl.constexpr, SPLIT: tl.constexpr):
    """out[row, cols] = (sum_g scales[cols, g] sum_{k in g} x[row, k] w[cols, k]) * vth[row] + bias[cols], cast to
    out's dtype, for the BN output channels of block cb. x [M, K] any float dtype, taken to fp32; w [N, K] in
    format FMT: W_INT8 (int8, fp32 by conversion), W_E4M3 (e4m3 bits converted by Triton), W_E4M3_BITS (the same
    bits decoded by integer operations), W_FLOAT (fp16/bf16, no scales); scales fp32 [N, G] in groups of GS (a tile
    of BK never crosses one; GROUPED: G > 1). ACC2D: the products summed into a [BN, BK] accumulator, one reduction
    at the end (one group: the scale after it; groups: each product times its group's scale first); else each tile
    reduced, then scaled. MAGIC: int8 to fp32 by the bits of 2^23 + (q + 128), less 2^23 + 128 (integer and add
    instructions instead of the conversion's slower ones). SPIKE: x is a layer's input, and its spike counts are
    made here (model.spike_quant at k: a first pass over the row for vth = clamp(mean|x| / k), then
    round(x / vth) per tile, IEEE division; 2: rounded to e4m3 as e4m3_counts, unless the row's largest count passes
    448), vth then as HAS_VTH's. Each product is rounded once in fp32 (twice where ACC2D scales it), then the
    sums. DOT (int8 or e4m3 weights, not SPIKE): x holds spike counts, multiplied on the tensor cores (_row_dot); a
    row that is not exact in the weight's 8-bit type takes the loop of the CUDA cores instead.
    SPLIT > 1: this program sums part sk of K alone (whole tiles; a part past K sums nothing) and stores it in
    part[tile, sk] (fp32 [tiles, SPLIT, BN]), then takes a ticket (tickets[tile], one per block of channels); the
    program whose ticket is the last adds the SPLIT parts, sets the ticket back to 0 and stores the block: more
    programs for a weight of few channels, with no second launch and no zeroed output."""
    cols, o_k = cb * BN + tl.arange(0, BN), tl.arange(0, BK)
    rn = cols % N                                   # channels past N wrap around: no masks; not stored
    pw = w + rn.to(tl.int64)[:, None] * K + o_k[None, :]
    px = x + row * K + o_k
    if SPLIT == 1:
        k0, k1 = 0, K
    else:
        k0 = sk * (tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK)
        k1 = tl.minimum(k0 + tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK, K)
    acc = tl.zeros([BN], dtype=tl.float32)
    v = 1.0
    if SPIKE:   # every program reads the row once more (from L2) for vth, rather than a one-program pass before
        v, wide = _row_vth(px, o_k, K, k, BK, SPIKE == 2)
    slow = True
    if DOT:   # counts x 8-bit weights on the tensor cores; a row they cannot take exactly: the loop below
        acc, slow = _row_dot(x, w, scales, row, rn, k0, k1, K, G, GS, BN, BK, FMT, EVEN_K, GROUPED)
    if slow:
        acc = tl.zeros([BN], dtype=tl.float32)
        acc2 = tl.zeros([BN, BK], dtype=tl.float32)
        for lo in range(k0, k1, BK):
            xt, wt = _row_tile(px, pw, lo, o_k, K, EVEN_K)
            if SPIKE:
                xt = _counts(xt, v, wide, SPIKE == 2)
            if FMT == 0 and MAGIC:
                wf = ((wt.to(tl.uint8, bitcast=True).to(tl.uint32) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True)
                wf = wf - 8388736.0
            elif FMT == 1:
                wf = wt.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            elif FMT == 2:
                wf = _e4m3_bits_to_f32(wt)
            else:                                       # int8 by the conversion instruction, or float weights
                wf = wt.to(tl.float32)
            if ACC2D and GROUPED:
                acc2 += (wf * xt[None, :]) * tl.load(scales + rn * G + lo // GS)[:, None]
            elif ACC2D:
                acc2 += wf * xt[None, :]
            elif FMT == 3:
                acc += tl.sum(wf * xt[None, :], axis=1)
            else:
                acc += tl.sum(wf * xt[None, :], axis=1) * tl.load(scales + rn * G + lo // GS)
        if ACC2D:
            acc = tl.sum(acc2, axis=1)
            if FMT != 3 and not GROUPED:
                acc = acc * tl.load(scales + rn)
    if SPLIT == 1:
        _row_out(acc, out, vth, bias, row, N, cols, rn, v, HAS_VTH, HAS_BIAS, SPIKE)
    else:
        o_n = tl.arange(0, BN)
        tl.store(part + (tile * SPLIT + sk) * BN + o_n, acc)
        tl.debug_barrier()   # every thread's part stored before the ticket (its atomic releases them to the GPU)
        if tl.atomic_add(tickets + tile, 1) == SPLIT - 1:   # acquires the other parts; .cg reads them past L1
            ps = tl.load(part + tile * SPLIT * BN + tl.arange(0, SPLIT)[:, None] * BN + o_n[None, :],
                         cache_modifier=".cg")
            tl.atomic_xchg(tickets + tile, 0)
            _row_out(tl.sum(ps, axis=0), out, vth, bias, row, N, cols, rn, v, HAS_VTH, HAS_BIAS, SPIKE)


def _row_key(fmt, K, N, counts=False):
    """GEMV_ROW_CONFIGS' key of a weight [N, K] in format fmt; counts: x holds spike counts (vth given), so int8
    weights are W8ASpike's ("w8aspike"), not weight-only int8's."""
    kind = {W_INT8: "w8aspike" if counts else "int8", W_FLOAT: "float"}.get(fmt, "e4m3")
    return kind, "wide" if N > K else "tall"


def gemv_row_fits(M, K, N, group_size, fmt, device, counts=False):
    """Does _gemv_row_kernel take M rows times a weight [N, K] in format fmt, groups of group_size, on device (counts:
    x holds spike counts)? Up to GEMV_ROW_MAX_ROWS rows, whole groups (group_size divides K, or one group of K), and
    not a shape whose setting on this device is None (there the gemv8 op measured faster)."""
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else device.type
    return (0 < M <= GEMV_ROW_MAX_ROWS and (group_size >= K or K % group_size == 0)
            and GEMV_ROW_CONFIGS.get(cap, {}).get(_row_key(fmt, K, N, counts), GEMV_ROW_SAFE) is not None)


ROW_TICKETS = 1 << 16    # the most blocks of channels (programs along N, times rows) one split GEMV may have


def row_tickets(device, make=True):
    """_gemv_row_kernel's tickets on device (int32 [ROW_TICKETS], made zero once; each split launch leaves them
    zero). Made by this call (make), never inside _gemv_row: a launch on a device without them takes no split. So
    compile_decode makes them before any CUDA graph and its warm-up calls (inductor runs those in the graph's memory
    pool, where they could not stay), as does an eager caller that wants the split. None where not made, or while a
    CUDA graph is captured. Launches on one device share them: they run in stream order, never two at once."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    t = row_tickets.held.get(device)
    if t is None and make and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        t = row_tickets.held[device] = torch.zeros(ROW_TICKETS, dtype=torch.int32, device=device)
    return t


row_tickets.held = {}


def _gemv_row(x, ws, sts, vth, biases, outs, group_size, fmt, cfg, spike_k=0.0):
    """Launch _gemv_row_kernel for one weight, _gemv_rows_kernel for 2-4 (lists ws, sts, biases, outs) with cfg's
    settings (BN: at most, halved until the matrices give every SM two programs; BK: at most, within a group;
    num_warps, num_stages; ACC2D, default True; MAGIC, default True; DOT, default False: counts (vth given) times
    int8 or e4m3 weights on the tensor cores, BN then at least 16; SPLIT, default 1: programs a block of channels
    splits K among, a power of 2, with row_tickets); spike_k > 0: the kernel makes x's counts."""
    (M, K), Ns = x.shape, [w.shape[0] for w in ws]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    gs = min(group_size, K)
    one = fmt == W_FLOAT or gs == K
    BK = min(cfg["BK"], triton.next_power_of_2(K)) if one else _int8_gemv_tile_k(K, gs, cfg["BK"])
    # tl.dot on 8-bit operands takes K tiles of 32 at least
    dot = bool(cfg.get("DOT")) and vth is not None and fmt in (W_INT8, W_E4M3) and not spike_k and BK >= 32
    split = cfg.get("SPLIT", 1)
    if split < 1 or split & (split - 1):
        raise ValueError(f"gemv_row setting SPLIT={split}: give a power of 2 (1: no split)")
    tickets = row_tickets(x.device, make=not x.is_cuda) if split > 1 else None
    split = split if tickets is not None else 1
    BN = max(cfg["BN"], 16) if dot else cfg["BN"]
    while BN > (16 if dot else 2) and sum(triton.cdiv(N, BN) for N in Ns) * M * split < 2 * sms:
        BN //= 2
    tiles = sum(triton.cdiv(N, BN) for N in Ns) * M
    if tiles > ROW_TICKETS:
        tickets, split = None, 1
    part = x.new_empty(tiles * split * BN, dtype=torch.float32) if split > 1 else None
    st = sts[0]
    meta = dict(GS=gs, BN=BN, BK=BK, FMT=fmt, EVEN_K=K % BK == 0, ACC2D=cfg.get("ACC2D", True),
                MAGIC=cfg.get("MAGIC", True), GROUPED=st is not None and st.shape[1] > 1, HAS_VTH=vth is not None,
                HAS_BIAS=biases[0] is not None, SPIKE=0 if not spike_k else 1 if fmt in (W_INT8, W_FLOAT) else 2,
                DOT=dot, SPLIT=split, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grid = (tiles, split)
    G = 1 if st is None else st.shape[1]
    if len(ws) == 1:
        _gemv_row_kernel[grid](x, ws[0], st, vth, biases[0], outs[0], part, tickets, Ns[0], K, G, float(spike_k),
                               **meta)
    else:   # unused places repeat the last matrix with no channels
        last = len(ws) - 1
        segs = [a for i in range(4) for a in (ws[min(i, last)], sts[min(i, last)], biases[min(i, last)],
                                              outs[min(i, last)], Ns[i] if i <= last else 0)]
        _gemv_rows_kernel[grid](x, vth, *segs, part, tickets, K, G, float(spike_k), **meta)
    return outs


def _row_products(x, ws, scales, group_size, fmt, vth, biases, out_dtype, spike_k):
    """gemv_row's and gemv_rows' work: x [M, K] times each weight of ws in one launch -> [out_dtype [M, N_i]]."""
    (M, K), dev = x.shape, x.device
    if spike_k and (vth is not None or not spike_k > 0 or K * spike_k >= 2 ** 22):
        raise ValueError(f"gemv_row with spike_k={spike_k} makes the counts and vth of x itself: give vth None and "
                         f"0 < spike_k with K spike_k < 2^22 (K = {K})")
    outs = [x.new_empty(M, w.shape[0], dtype=out_dtype) for w in ws]
    if M == 0 or all(w.shape[0] == 0 for w in ws):   # a weight of no rows among others: a segment of no blocks
        return outs
    sts = [None if s is None else s.float().contiguous() for s in scales]
    bs = [None if b is None else b.contiguous() for b in biases]
    v = None if vth is None else vth.float().contiguous()
    key = _row_key(fmt, K, ws[0].shape[0], vth is not None or bool(spike_k))
    opts = GEMV_ROW_CONFIGS.get(torch.cuda.get_device_capability(dev) if dev.type == "cuda" else dev.type, {})
    os_ = outs if dev.type == "cuda" else [o.float() for o in outs]   # the interpreter truncates 16-bit stores
    os_ = with_fallback(lambda cfg: _gemv_row(x.contiguous(), [w.contiguous() for w in ws], sts, v, bs, os_,
                                              group_size, fmt, cfg or GEMV_ROW_SAFE, spike_k), opts.get(key),
                        ("gemv_row", str(dev), fmt, *key), "gemv_row")
    return outs if os_ is outs else [o.to(out_dtype) for o in os_]


@torch.library.custom_op("spikingbrain::gemv_row", mutates_args=())
def gemv_row(x: torch.Tensor, w: torch.Tensor, scales: Optional[torch.Tensor], group_size: int, fmt: int,
             vth: Optional[torch.Tensor], bias: Optional[torch.Tensor], out_dtype: torch.dtype,
             spike_k: float = 0.0) -> torch.Tensor:
    """A decode step's product of a few rows (gemv_row_fits) with one weight matrix on _gemv_row_kernel, one opaque
    op (a compiled decode step keeps it in its graph, one launch):
        y[m, n] = (sum_g scales[n, g] sum_{k in g} x[m, k] w[n, k]) * vth[m] + bias[n]   -> out_dtype [M, N]
    x [M, K] float; w [N, K]: int8 (fmt W_INT8), e4m3 bits as uint8 (W_E4M3, W_E4M3_BITS; scales [N, 1]), or the
    float weight itself (W_FLOAT, scales None); scales fp32 [N, G], groups of group_size; vth fp32 [M, 1] or None;
    bias [N] or None. Each product x * w rounds once in fp32 (exact where x holds spike counts below 2^16 or bf16
    values: |w| has at most 8 significant bits; once more where the group's scale multiplies it), then fp32 sums: a
    tile's BK products, its scale, the P tiles of a row, vth and the bias, so before the cast
        |y - y64| <= (BK + P + 5) 2^-24 (sum_k |x[m, k] w[n, k] s[n, g(k)]| |vth[m]| + |bias[n]|)
    with y64 the same formula in float64 (int8_gemv_torch; spike_linear_fp8_torch). Twin: those two.
    spike_k > 0 (vth None): x is the layer's input and the kernel makes its spike counts and vth (spike_quant at
    spike_k; for e4m3 weights rounded as e4m3_counts), no pass over x before the launch; the same bound, with x, vth
    the counts and vth of spike_quant_torch (the mean's fp32 sum may differ in order, so vth in its last bit).
    A setting with DOT (counts, vth given, int8 or e4m3 weights): the same bound, except that e4m3 on a GPU adds
    the tensor cores' rounding within each 32 products (tested within 2^-9 sum_k |x w s vth| on an H200)."""
    return _row_products(x, [w], [scales], group_size, fmt, vth, [bias], out_dtype, spike_k)[0]


@gemv_row.register_fake
def _(x, w, scales, group_size, fmt, vth, bias, out_dtype, spike_k=0.0):
    return x.new_empty(x.shape[0], w.shape[0], dtype=out_dtype)


@torch.library.custom_op("spikingbrain::gemv_rows", mutates_args=())
def gemv_rows(x: torch.Tensor, ws: list[torch.Tensor], scales: list[Optional[torch.Tensor]], group_size: int,
              fmt: int, vth: Optional[torch.Tensor], biases: list[Optional[torch.Tensor]],
              out_dtype: torch.dtype, spike_k: float = 0.0) -> list[torch.Tensor]:
    """gemv_row of the same rows x with 2-4 weights [N_i, K] in one launch (_gemv_rows_kernel): [y_i], each as
    gemv_row(x, ws[i], scales[i], group_size, fmt, vth, biases[i], out_dtype, spike_k) with its bound. The weights share
    their format, group size and GEMV_ROW_CONFIGS' shape ("wide" or "tall"); the biases are all given or all None.
    decode_cse(group=True) puts a compiled step's projections of one input together here (q, k, v; gate, up)."""
    if not 2 <= len(ws) <= 4 or len(scales) != len(ws) or len(biases) != len(ws):
        raise ValueError(f"gemv_rows takes 2-4 weights with a scale and a bias (or None) each; got {len(ws)} "
                         f"weights, {len(scales)} scales, {len(biases)} biases")
    if len({w.shape[1] for w in ws} | {x.shape[1]}) != 1 or len({_row_key(fmt, *w.shape[::-1]) for w in ws}) != 1:
        raise ValueError(f"gemv_rows: the weights {[tuple(w.shape) for w in ws]} must share x's K = {x.shape[1]} "
                         f"and one GEMV_ROW_CONFIGS shape (all N > K or all N <= K)")
    if len({b is None for b in biases}) != 1:
        raise ValueError("gemv_rows: give every weight a bias or none")
    return _row_products(x, ws, scales, group_size, fmt, vth, biases, out_dtype, spike_k)


@gemv_rows.register_fake
def _(x, ws, scales, group_size, fmt, vth, biases, out_dtype, spike_k=0.0):
    return [x.new_empty(x.shape[0], w.shape[0], dtype=out_dtype) for w in ws]


# The 8-bit GEMVs traced into a compiled decode step (kernels.compile_decode), per weight format: "inductor" writes
# them as gemv8_fused's tensor formula (inductor's tuned reductions, as it writes bf16 F.linear at batch 1), "triton"
# keeps the gemv8 op (tl.dot on rows padded to 16, split along K). Neither reads 8-bit weights near the bandwidth yet
# on an H200; whole-model decode put the formula ahead for e4m3 weights (one scale per row) and the op ahead for int8
# weights in groups of 128 (BENCHMARKS.md). Eager steps always take the op: there the formula would materialise an
# fp32 weight. bench.py decode --gemv8 sets both.
GEMV8_COMPILED = {"int8": "triton", "fp8": "inductor"}


def fused_gemv8(fmt):
    """Does an 8-bit GEMV of weight format fmt ("int8", "fp8") called now take gemv8_fused? (traced into a compiled
    graph, GEMV8_COMPILED[fmt] "inductor")"""
    return GEMV8_COMPILED[fmt] == "inductor" and torch.compiler.is_compiling()


@torch.library.custom_op("spikingbrain::realized", mutates_args=())
def realized(x: torch.Tensor) -> torch.Tensor:
    """A copy of x, opaque to inductor. Left to itself inductor recomputes a cheap producer of a GEMV's input (the
    spike counts: a division, rounding, e4m3 rounding per element) inside the GEMV's reduction, once per weight row,
    which makes an 8-bit GEMV bound by arithmetic instead of by its weight reads; behind this op the input is written
    once and read as it is."""
    return x.clone()


@realized.register_fake
def _(x):
    return torch.empty_like(x)


def gemv8_fused(x, w, scales, group_size, fp8=False):
    """x [M, K] @ (w * scales per group).T -> fp32 [M, N] as plain tensor ops, for a compiled decode step
    (GEMV8_COMPILED): w int8 [N, K], or (fp8) e4m3 bits as uint8; scales [N, G], groups of group_size input channels
    (the last one shorter where group_size does not divide K: zeros pad it; fp8: one group of K). w [M, N, K] and
    scales [M, N, G]: a matrix per row (each row's expert: expert_rows). Inductor writes the sums within groups as
    one reduction that reads each weight byte once and converts it in registers (gpt-fast's int8 weight-only
    decode), then the scales and the sum over groups as a small second one; x comes realized. Each
    product rounds once in fp32, each group's sum, its scale and the sum over groups in fp32, so
        |y - y64| <= (K + 2) 2^-24 sum_k |x[m, k] q[n, k] s[n, g(k)]|
    (y64: int8_gemv_torch on the same operands). Twin: int8_gemv_torch."""
    (M, K), G = x.shape, scales.shape[-1]
    gs = min(group_size, K)
    q = (w.view(torch.float8_e4m3fn) if fp8 else w).float()
    xg = F.pad(realized(x.float()), (0, G * gs - K)).view(M, 1, G, gs)
    qg = F.pad(q, (0, G * gs - K)).view(*q.shape[:-1], G, gs)            # [(M,) N, G, gs]
    return ((xg * qg).sum(-1) * scales.float()).sum(-1)                  # [M, N, G] group sums, then [M, N]


def int8_gemv(x, qweight, scales, group_size, bias=None, splits=None):
    """Batch-small linear layer with INT8 weights, dequantized in registers (decode, weight-only INT8):
        y[m, n] = sum_g scales[n, g] * (sum_{k in group g} x[m, k] * qweight[n, k])  (+ bias[n]).

    x [M, K] float (fp32, fp16 or bf16), M <= 16 (decode: INT8_GEMV_MAX_ROWS); qweight int8 [N, K]; scales [N, G],
    G = ceil(K / group_size): groups of group_size input channels, the last one shorter where group_size does not
    divide K (spiking.quantize_weight's layout); bias [N] or None. splits: programs along K per column tile (None:
    enough to fill the GPU twice). Returns [M, N] in x's dtype.

    Exactness: each product x * q is exact in fp32 (q converts to x's dtype without rounding), so only the fp32
    sums round: a tile's BK products inside tl.dot, its sum times the group's scale, the P tiles of a row and the
    splits added up, then + bias. So
        |y - y_float64| <= (BK + 2P + 2) 2^-24 (sum_k |x[m, k] qweight[n, k] scales[n, g(k)]| + |bias[n]|)
    before the cast to x's dtype (y_float64: int8_gemv_torch on the same operands; BK <= 128).
    Settings: INT8_GEMV_CONFIGS for the device's capability, else (or where they do not compile) INT8_GEMV_SAFE.
    Traced into a compiled graph with GEMV8_COMPILED["int8"] "inductor": gemv8_fused instead (its own bound). One
    row (gemv_row_fits): gemv_row (its own bound). Twin: int8_gemv_torch.
    """
    _check_int8_gemv(x, qweight, scales, group_size, bias)
    if gemv_row_fits(*x.shape, qweight.shape[0], group_size, W_INT8, x.device):   # one row: one launch
        return gemv_row(x, qweight, scales, group_size, W_INT8, None, bias, x.dtype)
    y = gemv8_fused(x, qweight, scales, group_size) if fused_gemv8("int8") else _gemv8_op(x, qweight, scales,
                                                                                         group_size, splits)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_gemv_torch(x, qweight, scales, group_size, bias=None):
    """PyTorch twin of int8_gemv in float64, group by group: the same formula over the same operands. [M, N]
    float64."""
    K = x.shape[-1]
    y = 0
    for g, j in enumerate(range(0, K, group_size)):
        c = slice(j, min(j + group_size, K))
        y = y + (x[:, c].double() @ qweight[:, c].double().T) * scales[:, g].double()
    return y if bias is None else y + bias.double()


def gemv_counts_torch(x, k=3.0, fp8=False):
    """The spike counts of x [M, K] as the 8-bit GEMVs multiply them, fp32 (fp8: e4m3_counts' rounding), and vth."""
    counts, vth = spike_quant_torch(x, k)
    if not fp8:
        return counts, vth
    # a row's largest |count| is round(max|x| / vth): dividing by vth and rounding (ties to even, symmetric) keep the
    # order of |x|, so max|x| is read in the pass over x that sums |x| for vth, not in one more pass over the counts
    top = torch.round(x.float().abs().amax(-1, keepdim=True) / vth)
    return e4m3_counts(counts, top), vth


ROW_COUNTS = False  # True: a one-row decode GEMV's spike counts from spike_counts (one program a row, the whole row
                    # in registers at decode widths); False: gemv_counts_torch, which a compiled step fuses into the
                    # pass making x. The one-program kernel waits on its loads, its reduction and its stores in
                    # turn, one launch more per input: not faster (BENCHMARKS.md; bench.py decode --row_counts)
ROW_COUNTS_BLOCK = 32768   # the most elements of a row _spike_counts_kernel holds at once; wider rows loop


@triton.jit
def _spike_counts_kernel(x, c, vth, K, k, BLOCK: tl.constexpr, FP8: tl.constexpr):
    """gemv_counts_torch for row pid of x [M, K]: vth = clamp(mean|x| / k, 1e-5, 1e4) (the sum in tl.sum's order),
    counts = round(x / vth) with IEEE division, ties to even; FP8: rounded to e4m3 (e4m3_counts) unless the row's
    largest count passes 448. One pass for the sums, one for the counts (from L1/L2: the row was just read)."""
    row, o = tl.program_id(0).to(tl.int64), tl.arange(0, BLOCK)
    px, pc = x + row * K + o, c + row * K + o
    v, wide = _row_vth(px, o, K, k, BLOCK, FP8)
    for lo in range(0, K, BLOCK):
        m = lo + o < K
        tl.store(pc + lo, _counts(tl.load(px + lo, mask=m, other=0.0).to(tl.float32), v, wide, FP8), mask=m)
    tl.store(vth + row, v)


@torch.library.custom_op("spikingbrain::spike_counts", mutates_args=())
def spike_counts(x: torch.Tensor, k: float, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """gemv_counts_torch(x, k, fp8) on _spike_counts_kernel, one opaque op (a compiled decode step keeps it, x
    written once by the pass before it): x [M, K] float -> counts fp32 [M, K], vth fp32 [M, 1]. Equal to the twin
    bit for bit where both sums of |x| agree (any order: e.g. values with few significant bits); else vth may move
    by the last bits of a sum in another order (and a count at a tie with it). Twin: gemv_counts_torch."""
    if x.dim() != 2 or not k > 0:
        raise ValueError(f"spike_counts takes x [M, K] and k > 0; got {tuple(x.shape)}, k={k}")
    M, K = x.shape
    c, v = x.new_empty(M, K, dtype=torch.float32), x.new_empty(M, 1, dtype=torch.float32)
    if M and K:
        block = min(triton.next_power_of_2(K), ROW_COUNTS_BLOCK)
        _spike_counts_kernel[(M,)](x.contiguous(), c, v, K, float(k), BLOCK=block, FP8=fp8,
                                   num_warps=max(4, min(32, block // 1024)))
    return c, v


@spike_counts.register_fake
def _(x, k, fp8=False):
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape[0], 1, dtype=torch.float32)


def gemv8_fused_spikes(x, w, scales, group_size, k, fp8):
    """The spiking 8-bit GEMV of a compiled decode step: gemv8_fused on x's spike counts (gemv_counts_torch), times
    vth -> fp32 [M, N]; w and scales as gemv8_fused takes them (one matrix, or one per row)."""
    counts, vth = gemv_counts_torch(x, k, fp8)
    return gemv8_fused(counts, w, scales, group_size, fp8) * vth


def spike_count_rows_torch(x, k=3.0, fp8=False):
    """The spike counts of x [M, K] as the 8-bit GEMV multiplies them (w8aspike_gemv, fp8_gemv): rows [hi; lo] fp32
    [2M, K] with hi + lo = the counts c (fp8: e4m3_counts' rounding; else exact), hi their top 11 significant bits
    and lo the rest. Both have c's sign (|hi| + |lo| = |c|: no cancellation between the two rows' products) and are
    exact in tf32 for |c| < 2^22 (a count is at most K k: spike_gemv_fits). vth fp32 [M, 1]. No host sync."""
    c, vth = gemv_counts_torch(x, k, fp8)
    hi = (c.view(torch.int32) & -8192).view(torch.float32)   # the low 13 of fp32's 23 mantissa bits cleared
    return torch.cat([hi, c - hi]), vth


FP16_MAX = torch.finfo(torch.float16).max   # 65504
SPIKE_GEMV_HALF = True   # count rows in fp16 where they fit (K k below FP16_MAX): fp16 tl.dot, no int-to-float
                         # conversion instructions for int8 weights; False: tf32 always (A/B in bench.py decode)


def spike_gemv_fits(x, k):
    """Does the 8-bit GEMV take the spike counts of x [..., K] at k? At most 8 rows (each enters as two: the
    kernel's tile holds 16; and within INT8_GEMV_MAX_ROWS), counts below 2^22 (a count is at most K k)."""
    return x.shape[:-1].numel() <= min(INT8_GEMV_MAX_ROWS, 8) and x.shape[-1] * k < 2 ** 22


def _spike_gemv(x, w, scales, group_size, k, bias, splits, fp8):
    """w8aspike_gemv's and fp8_gemv's common path: x [..., K] -> one row: gemv_row on the counts (gemv_row_fits);
    else in a compiled decode step gemv8_fused on the counts (fused_gemv8), else spike_count_rows_torch (one compiled
    pass when eager on CUDA) and the gemv8 op on the hi and lo rows (fp16 or tf32); y = counts @ W.T * vth (+ bias)
    -> [..., N] in x's dtype."""
    if not k > 0:
        raise ValueError(f"spike k={k} must be > 0")
    x2 = x.reshape(-1, x.shape[-1])
    M = x2.shape[0]
    if not spike_gemv_fits(x, k):   # 2M rows would pass the kernel's 16-row tile: the rows past it never written
        name, other = ("fp8_gemv", "spike_linear_fp8") if fp8 else ("w8aspike_gemv", "w8aspike_linear")
        raise ValueError(f"{name} multiplies at most 8 rows (decode) with spike counts below 2^22 (K k); got {M} "
                         f"rows, K k = {x2.shape[1] * k:g}: use {other}")
    fmt = (W_E4M3 if _fp8_gemv_format(x.device) == 1 else W_E4M3_BITS) if fp8 else W_INT8
    if gemv_row_fits(M, x2.shape[1], w.shape[0], group_size, fmt, x.device, counts=True):
        if GEMV_ROW_SPIKES:   # one row: one launch that makes the counts too
            return gemv_row(x2, w, scales, group_size, fmt, None, bias, x.dtype, float(k)).view(*x.shape[:-1], -1)
        # the counts (one program a row; or compiled: fused into the pass that makes x), then one launch
        counts, vth = (spike_counts if ROW_COUNTS else compiled(gemv_counts_torch) if x.is_cuda
                       else gemv_counts_torch)(x2, k, fp8)
        return gemv_row(counts, w, scales, group_size, fmt, vth, bias, x.dtype).view(*x.shape[:-1], -1)
    if fused_gemv8("fp8" if fp8 else "int8"):
        y = gemv8_fused_spikes(x2, w, scales, group_size, k, fp8)
    else:
        count_rows = compiled(spike_count_rows_torch) if x.is_cuda else spike_count_rows_torch
        rows, vth = count_rows(x2, k, fp8)
        half = SPIKE_GEMV_HALF and x2.shape[1] * k < FP16_MAX   # every count below fp16's largest: exact in fp16
        y = _gemv8_op(rows, w, scales, group_size, splits, fp8=fp8, tf32=True, half=half)
        y = (y[:M] + y[M:]) * vth
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], -1)


def w8aspike_gemv(x, qweight, scales, group_size, k=3.0, bias=None, splits=None):
    """spiking.W8ASpikeLinear's decode forward (a few rows) on int8_gemv's kernel, with no host sync (a compiled
    decode step keeps it in its graph; w8aspike_linear reads a flag on the host per call):
        y[m, n] = vth[m] * sum_g scales[n, g] * (sum_{k in group g} counts[m, k] * qweight[n, k])  (+ bias[n]),
    counts, vth = spike_quant(x, k), every count exact (none clamped to int8). x [..., K], at most 8 rows
    (spike_gemv_fits); qweight, scales, bias as int8_gemv. Returns [..., N] in x's dtype.

    The counts enter the kernel as two rows each (hi + lo, spike_count_rows_torch), so every product with an int8
    weight is exact (tl.dot in fp16 where every count lies below 65504, K k: SPIKE_GEMV_HALF; else tf32 on CUDA,
    fp32 elsewhere). Only fp32 sums round: int8_gemv's bound for each
    of the two rows, then their sum and * vth (tested). Traced into a compiled graph with GEMV8_COMPILED["int8"]
    "inductor": gemv8_fused on the counts, times vth. One row (gemv_row_fits): gemv_row on the counts, vth in it (its
    own bound). Twin: spike_linear_torch on spike_quant_torch's counts."""
    _check_int8_gemv(x.reshape(-1, x.shape[-1]), qweight, scales, group_size, bias)
    return _spike_gemv(x, qweight, scales, group_size, k, bias, splits, fp8=False)


def use_w8aspike_gemv(x, group_size, k):
    """w8aspike_gemv for a W8ASpikeLinear's input x [..., K] at spike k? Where use_int8_gemv would take the layer's
    decode rows and the 8-bit GEMV takes their counts (spike_gemv_fits)."""
    return spike_gemv_fits(x, k) and use_int8_gemv(x, group_size)


def use_int8_gemv(x, group_size):
    """int8_gemv for a weight-only INT8 layer's input x [..., K]? Decode-sized inputs (<= INT8_GEMV_MAX_ROWS rows)
    in inference, on CUDA (capability >= 8.0) or forced by INT8_GEMV_IMPL = "triton"."""
    if (torch.is_grad_enabled() and x.requires_grad) or x.numel() > INT8_GEMV_MAX_ROWS * x.shape[-1]:
        return False
    if not int8_gemv_fits(x.shape[-1], group_size) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    return INT8_GEMV_IMPL == "triton" or (INT8_GEMV_IMPL == "auto" and x.is_cuda
                                          and torch.cuda.get_device_capability(x.device) >= (8, 0))


# ----------------------------------------------------------------------------- decode with FP8 (e4m3) weights

# FP8SpikeLinear's decode step (a few rows) on the 8-bit GEMV above: the e4m3 weight read as its bytes and converted
# in registers (by Triton on capability >= 8.9 and in the interpreter, by integer ops on older GPUs: no FP8 tensor
# cores needed), one scale per output channel (one group of K). Unlike spike_linear_fp8 (torch._scaled_mm) it reads
# no flag on the host, so a compiled decode step keeps it in its graph. Settings as INT8_GEMV_CONFIGS (fp32 counts
# instead of bf16 activations), a starting point not yet swept; INT8_GEMV_SAFE where they do not compile.
FP8_GEMV_CONFIGS = {(9, 0): dict(BN=64, BK=128, num_warps=4, num_stages=4),
                    (8, 0): dict(BN=64, BK=128, num_warps=4, num_stages=3)}
FP8_GEMV_IMPL = "auto"    # "auto": fp8_gemv on CUDA (capability >= 8.0) for <= INT8_GEMV_MAX_ROWS rows, else
                          # spike_linear_fp8 / the float reference; "triton" forces it (TRITON_INTERPRET=1 on a CPU:
                          # tests), "torch" turns it off


def _fp8_gemv_format(device):
    """_gemv8_kernel's FMT for e4m3 weights on device: 1 (Triton's conversion) on capability >= 8.9 and in the
    interpreter, 2 (integer decoding) on older GPUs, where Triton has no e4m3 type, and where 1 did not compile
    (fp8_format_failed: a Triton version without it falls back instead of stopping the run)."""
    if str(device) in fp8_format_failed:
        return 2
    return 2 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9) else 1


fp8_format_failed = set()   # devices where Triton's e4m3 conversion did not compile


def fp8_gemv(x, bits, scale, k=3.0, bias=None, splits=None):
    """spiking.FP8SpikeLinear's decode forward (a few rows), the product of spike_linear_fp8 with no host sync:
        y[m, n] = (sum_k c[m, k] * e4m3(bits[n, k])) * scale[n] * vth[m]  (+ bias[n]),
    counts, vth = spike_quant(x, k), c = the counts rounded to e4m3, but a row holding a count past 448 keeps its
    exact counts (selected by torch.where, not by a host-side branch). x [..., K] (at most 8 rows; decode:
    INT8_GEMV_MAX_ROWS); bits uint8 [N, K] (FP8SpikeLinear.fp8_weight, or the float8_e4m3fn view); scale [N]; bias
    [N] or None. Returns [..., N] in x's dtype.

    The counts enter the kernel as two rows each (hi + lo, spike_count_rows_torch; fp16 below 65504 as
    w8aspike_gemv), products exact, sums in fp32: against spike_linear_fp8_torch (float64, the same operands),
    before the cast to x's dtype,
        |y - y64| <= (BK + 2P + 4) 2^-24 (sum_k |c w| vth scale + |bias|)
    with BK <= 128 the K tile and P the tiles of a row (int8_gemv's bound, plus the hi + lo sum and vth). Traced into
    a compiled graph with GEMV8_COMPILED["fp8"] "inductor" (the default): gemv8_fused on the rounded counts, times
    vth (gemv8_fused's bound, plus vth's rounding). One row (gemv_row_fits): gemv_row on the rounded counts (its own
    bound). Twin: spike_linear_fp8_torch.
    """
    K, N = x.shape[-1], bits.shape[0]
    if bits.dtype == torch.float8_e4m3fn:
        bits = bits.view(torch.uint8)
    if bits.dtype != torch.uint8 or bits.shape != (N, K) or scale.shape != (N,) or (
            bias is not None and bias.shape != (N,)):
        raise ValueError(f"fp8_gemv: x [..., K], bits uint8 [N, K], scale [N], bias [N] or None; got "
                         f"{tuple(x.shape)}, {bits.dtype} {tuple(bits.shape)}, {tuple(scale.shape)}, "
                         f"{None if bias is None else tuple(bias.shape)}")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")
    return _spike_gemv(x, bits, scale.view(N, 1), K, k, bias, splits, fp8=True)


def use_fp8_gemv(x, k=3.0):
    """fp8_gemv for an FP8SpikeLinear's input x [..., K] at spike k? Decode-sized inputs the 8-bit GEMV takes
    (spike_gemv_fits) in inference, on CUDA (capability >= 8.0) or forced by FP8_GEMV_IMPL = "triton"."""
    if (torch.is_grad_enabled() and x.requires_grad) or not spike_gemv_fits(x, k):
        return False
    return FP8_GEMV_IMPL == "triton" or (FP8_GEMV_IMPL == "auto" and x.is_cuda
                                         and torch.cuda.get_device_capability(x.device) >= (8, 0))

"""Every fast path of model.py, each beside the switch that chooses it and with a twin in model.py that the tests
compare against:
- Triton kernels for gated linear attention: chunked forward + backward (packed documents too) and a decode step
  (twins: model.gla_recurrent / gla_chunked);
- softmax attention of one query over a cache (decode_attention), flex_attention with the block masks of a sliding
  window (only the band's tiles) and of packed documents / sinks / a cache, with kernel options per device and a
  fallback (twin: model.attention, SDPA with a dense mask);
- the loss in chunks of rows with its gradient made in the same pass, compiled on CUDA (twin: cross-entropy of the
  full logits); torch.compile of the blocks and of the decode step; spike quantization (twin: model.spike_quant).
GLA_IMPL and ATTN_IMPL force either path; model.py imports nothing else of this file but the `use_*` predicates and
the ops they guard. Nothing here imports model.py.

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
import os
import warnings

import torch
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


def use_gla(q):
    return GLA_IMPL == "triton" or (GLA_IMPL == "auto" and q.is_cuda)


def gla(q, k, v, g, initial_state=None, cu_seqlens=None):
    """model.gla on the kernels: the recurrent one for a few tokens without gradients (decode), else the chunked."""
    decode = q.shape[1] <= 4 and cu_seqlens is None and not torch.is_grad_enabled()
    fn = fused_recurrent_gla if decode else chunk_gla
    return fn(q, k, v, g, initial_state=initial_state, output_final_state=True, cu_seqlens=cu_seqlens)


def use_flex(q):
    """flex_attention for queries q [B, T, ...]? Compiled (CUDA), it needs more than one tile of 128 queries."""
    if q.is_cuda and q.shape[1] <= 128:
        return False
    return ATTN_IMPL == "flex" or (ATTN_IMPL == "auto" and q.is_cuda)


def use_band(q, window):
    """sliding_window_attention for these queries of one document (prefill or training, not decode)?"""
    return window is not None and q.shape[1] > 1 and use_flex(q)


def use_decode_attention(q):
    """decode_attention for q [B, 1, H, D] (one query per row over a cache, no gradient)?"""
    return (q.shape[1] == 1 and (ATTN_IMPL == "triton" or (ATTN_IMPL == "auto" and q.is_cuda))
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
    """torch.compile of fn, made once (recompiles once with dynamic shapes on a new size)."""
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

        def ordered(d):   # per query tile: how many key tiles, and which (ascending, padded after)
            return (d.sum(-1, dtype=torch.int32)[None, None],
                    torch.argsort((~d).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None])
        shift = torch.tensor(off, device=device)

        def mask_mod(b, h, qi, ki):
            d = qi + shift - ki
            return (d >= 0) & (d <= window)
        _swa_masks[key] = BlockMask.from_kv_blocks(*ordered(some & ~full), *ordered(full), tile, mask_mod,
                                                   seq_lengths=(T, S))
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
    """model.attention on flex_attention: `visible` (model.visible) becomes a block mask, never a dense one.
    q [B, T, H, D]; k, v [B, S, Hkv, D]; pos/doc [B, T] / [B, S]. Returns [B, T, H, D]."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T, H, _ = q.shape
    def mask_mod(b, h, qi, ki):
        return visible(q_pos[b, qi], k_pos[b, ki], q_doc[b, qi], k_doc[b, ki], window)
    bm = create_block_mask(mask_mod, B, None, T, k.shape[1], device=q.device, _compile=q.is_cuda)
    gqa = bool(H != k.shape[2])
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return flex(q, k, v, bm, gqa).transpose(1, 2)


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
        total = x.new_zeros((), dtype=torch.float32)
        dx = torch.zeros_like(x) if grads else None
        dw = torch.zeros_like(w, dtype=torch.float32) if grads else None
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

def compile_blocks(model):
    """torch.compile every block (prefill and training): norms, RoPE, gates and activations fuse around the
    matmuls. The GLA kernels and the sliding-window prefill (flex_attention) run as they are between the compiled
    pieces."""
    for block in model.blocks:
        block.compile()


def compile_decode(fn, device, gemv=True):
    """torch.compile of a decode step fn (model.GPT.forward with input_pos); on CUDA with CUDA graphs and, with
    gemv, inductor's coordinate-descent tuning, under which it writes the batch-1 matmuls (matrix-vector products)
    as its own tuned reduction kernels instead of cuBLAS's (they read the weights nearer the bandwidth:
    BENCHMARKS.md). The tuning makes the first compile slower; inductor's on-disk cache keeps its results."""
    if device.type != "cuda":
        return torch.compile(fn)
    return torch.compile(fn, options={"triton.cudagraphs": True, "coordinate_descent_tuning": gemv})


def checkpoint_blocks(model):
    """Per-block activation checkpointing: keep each block's input, recompute its inside during backward (after
    compile_blocks, the wrapper recomputes the compiled block)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
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

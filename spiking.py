"""Spiking toolkit: spike codings, integrate-and-fire simulation, statistics, energy, rasters, W8ASpike. A library:
it reads and writes no files (convert.py loads and saves W8ASpike and FP8 checkpoints, eval.py measures checkpoints).

The spiking activation itself (`spike_quant`, the straight-through `spike`, `Linear.spike_k`) lives in
model.py, so training, generation and this file share one definition; it is re-exported here.

    counts, vth = spike_quant(x, k=3.0)            # x [..., C] -> integer counts [..., C], threshold [..., 1]
    train = encode(counts, "bidirectional")        # -> spike train [steps, ..., C]; decode(train, ...) inverts it
    spikes, v = if_neuron(x_steps, vth)            # the multi-step neuron a neuromorphic chip would run
    with collect_stats(model, window=3) as st:     # hooks on every model.Linear during any forward
        model(idx)
    st.summary()                                   # sparsity, spikes/channel, silent share, |count| histogram, energy
    scales = calibrate(model, batches)             # W8ASpike: INT8 weights per 128-channel group + spike activations
    replace_linears(model, k=3.0, scales=scales)
    quantize_int8(float_model)                     # or INT8 weights alone, activations kept (generate.py --quant)
    replace_linears_fp8(model, k=3.0)              # or e4m3 weights per output channel, counts as e4m3 (FP8 cores)
    writer.add_image("raster", spike_raster(train[:, 0, :64]))   # TensorBoard, uint8 [3, H, W]

Commands that use it:
    python convert.py w8aspike --ckpt out/ckpt --text data/calib.txt --out out/ckpt-w8aspike   # calibrate, quantize
    python convert.py fp8 --ckpt out/ckpt --out out/ckpt-fp8      # e4m3 weights (FP8SpikeLinear), streamed
    python eval.py spikes --ckpt out/ckpt --text data/valid.txt --k '[2,3,4]'   # sparsity, energy, d ppl per k

Departures from the release (BICLab/SpikingBrain-7B, W8ASpike/):
- its W8ASpike weights come from GPTQ; ours are max-scaled INT8 groups, optionally with a per-group clip
  ratio searched on calibration data (`calibrate`), no error feedback between columns;
- it also spikes the SWA query and INT8-quantizes SWA keys/values inside attention, and its MLP applies
  down_proj's float weight directly (swiglu_linear), skipping spikes there; we spike and quantize exactly the
  projections of the blocks (every model.Linear), nothing inside attention;
- codings take integer counts directly: no zero-point shifting of unsigned data (the release's x_zero).
"""
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (Config, ExpertLinear, Linear, check_spike_k, kernels,   # kernels: None without kernels.py
                   spike, spike_quant)

__all__ = ["spike_quant", "spike", "encode", "decode", "default_steps", "coding_range", "spike_events",
           "if_neuron", "collect_stats", "energy", "spike_raster", "quantize_weight", "dequantize_weight",
           "W8ASpikeLinear", "w8aspike_reference", "replace_linears", "quantize_int8", "replace_linears_for_state",
           "calibrate", "search_scales", "check_group_size", "quantize_weight_fp8", "dequantize_weight_fp8",
           "fp8_counts", "FP8SpikeLinear", "replace_linears_fp8", "quantized_format"]

# ----------------------------------------------------------------------------- codings: counts <-> spike trains

CODINGS = ("binary", "ternary", "bitwise", "bidirectional", "twos")
SIGNED = ("ternary", "bidirectional", "twos")
BITWISE = ("bitwise", "bidirectional", "twos")
MAX_BITS = 62          # bit planes of an int64 count


def _check_coding(coding):
    if coding not in CODINGS:
        raise ValueError(f"unknown coding {coding!r}; choose one of {CODINGS}")


def _as_int(counts):
    """Integer-valued tensor -> int64. A fraction, inf or nan is an error, not silently truncated."""
    if counts.dtype == torch.bool or counts.is_complex():
        raise ValueError(f"counts must be an integer-valued real tensor, got {counts.dtype}")
    if counts.is_floating_point():
        if not torch.isfinite(counts).all() or (counts != counts.round()).any():
            raise ValueError("counts must be integer-valued (finite, no fraction): round them first, e.g. spike_quant")
    return counts.to(torch.int64)


def coding_range(coding, steps):
    """(lo, hi): the counts a `steps`-step train of this coding represents exactly."""
    _check_coding(coding)
    return {"binary": (0, steps), "ternary": (-steps, steps), "bitwise": (0, 2 ** steps - 1),
            "bidirectional": (-(2 ** steps - 1), 2 ** steps - 1),
            "twos": (-2 ** (steps - 1), 2 ** (steps - 1) - 1)}[coding]


def default_steps(coding, counts):
    """Fewest steps the release's Int2Spike encoders use for these counts.

    binary: max count; ternary: max |count|; bitwise, bidirectional: max(1, bits of max |count|);
    twos: max(2, bits of max |count| + 1) (a sign bit; as the release, one more than -2^n needs).
    """
    _check_coding(coding)
    c = _as_int(counts)
    if coding in ("binary", "bitwise"):   # unsigned: negatives are an error (or saturate to 0) in encode
        c = c.clamp(min=0)
    m = int(c.abs().max()) if c.numel() else 0
    if coding in ("binary", "ternary"):
        return m
    return max(2, m.bit_length() + 1) if coding == "twos" else max(1, m.bit_length())


def place_values(coding, steps):
    """What one spike at step t is worth, [steps] int64: 1 (binary, ternary); 2^(steps-1-t), most significant
    bit first (bitwise kinds); the first step of two's complement weighs -2^(steps-1)."""
    _check_coding(coding)
    if coding not in BITWISE:
        return torch.ones(steps, dtype=torch.int64)
    p = 2 ** torch.arange(steps - 1, -1, -1, dtype=torch.int64)
    if coding == "twos" and steps:
        p[0] = -p[0]
    return p


def _fit(c, coding, steps, saturate):
    """Check (or, with saturate, clamp) int64 counts into the range of a `steps`-step train."""
    if not isinstance(steps, int) or steps < 0 or (coding in BITWISE and not 1 <= steps <= MAX_BITS):
        need = f"an int in 1..{MAX_BITS}" if coding in BITWISE else "an int >= 0"
        raise ValueError(f"steps={steps!r} for {coding} coding: need {need}")
    lo, hi = coding_range(coding, steps)
    if c.numel() and (c.min() < lo or c.max() > hi):
        if not saturate and lo == 0 and c.min() < 0:
            raise ValueError(f"{coding} coding is unsigned: counts must be >= 0 (got {int(c.min())}); use a signed "
                             f"coding ({', '.join(SIGNED)}), or saturate=True to clamp negatives to 0")
        if not saturate:
            raise ValueError(f"{coding} coding over {steps} steps holds counts in [{lo}, {hi}], got counts in "
                             f"[{int(c.min())}, {int(c.max())}]: use steps >= {default_steps(coding, c)}, or "
                             f"saturate=True to clamp counts into the range")
        c = c.clamp(lo, hi)
    return c


def encode(counts, coding="bidirectional", steps=None, saturate=False):
    """Integer counts [...] -> spike train [steps, ...] float32, values in {0, 1} or {-1, 0, 1}.

    binary: 1 at each of the first `count` steps (counts >= 0). ternary: sign(count) at the first |count| steps.
    bitwise: the bits of count, most significant first (counts >= 0). bidirectional: the bits of |count|, each
    spike carrying the sign of count (-5 -> -1, 0, -1). twos: `steps`-bit two's complement, MSB first.
    steps=None: `default_steps`, which represents every count exactly. Counts outside `coding_range(coding,
    steps)` are an error, or with saturate=True are clamped to the nearest representable count (negative
    counts become 0 in the unsigned codings), so decode gives the clamped value.
    """
    _check_coding(coding)
    c = _as_int(counts)
    steps = default_steps(coding, c) if steps is None else steps
    c = _fit(c, coding, steps, saturate)
    t = torch.arange(steps, device=c.device).view(-1, *[1] * c.dim())
    if coding == "binary":
        train = t < c
    elif coding == "ternary":
        train = (t < c.abs()) * c.sign()
    else:
        u = c & ((1 << steps) - 1) if coding == "twos" else c.abs()   # torch's int64 & is two's complement
        train = (u >> (steps - 1 - t)) & 1
        if coding == "bidirectional":
            train = train * c.sign()
    return train.to(torch.float32)


def decode(train, coding="bidirectional"):
    """Spike train [steps, ...] -> int64 counts [...]: sum over steps of spike * place_values(coding, steps)."""
    _check_coding(coding)
    allowed = (-1, 0, 1) if coding in ("ternary", "bidirectional") else (0, 1)
    if not torch.isin(train, torch.tensor(allowed, dtype=train.dtype, device=train.device)).all():
        raise ValueError(f"a {coding} spike train holds only {allowed}")
    if coding in BITWISE and not 1 <= train.shape[0] <= MAX_BITS:
        raise ValueError(f"a {coding} train has 1..{MAX_BITS} steps, got {train.shape[0]}")
    p = place_values(coding, train.shape[0]).to(train.device)
    return (train.to(torch.int64) * p.view(-1, *[1] * (train.dim() - 1))).sum(0)


def _popcount(u):
    """Number of set bits of each entry of a non-negative int64 tensor."""
    n = torch.zeros_like(u)
    while u.numel() and bool((u > 0).any()):
        n += u & 1
        u = u >> 1
    return n


def spike_events(counts, coding="bidirectional", steps=None, saturate=False):
    """Spikes (nonzero entries) each count becomes: `encode(...).ne(0).sum(0)`, without building the train.

    counts [...] -> int64 [...]. Arguments as `encode`.
    """
    _check_coding(coding)
    c = _as_int(counts)
    steps = default_steps(coding, c) if steps is None else steps
    c = _fit(c, coding, steps, saturate)
    if coding in ("binary", "ternary"):
        return c.abs()
    return _popcount(c & ((1 << steps) - 1) if coding == "twos" else c.abs())


# ----------------------------------------------------------------------------- integrate-and-fire neuron

def if_neuron(x, vth, threshold=0.5, bipolar=False):
    """Multi-step integrate-and-fire neuron, no leak, soft reset. x [T, ...] input per step; vth broadcastable.

        v_t = v_{t-1} - vth * s_{t-1} + x_t          (v_0 = 0, s_0 = 0)
        s_t = +1 if v_t >= threshold * vth;  -1 if bipolar and v_t < (threshold - 1) * vth;  else 0

    Returns spikes [T, ...] (x's dtype) and the final potential v_T - vth * s_T [...].
    Charge is conserved: vth * sum(s) = sum(x) - v_final. The neuron is silent exactly when v lies in
    [(threshold - 1) * vth, threshold * vth), an interval of width vth; so whenever the final potential lies
    there (the neuron has come to rest), sum(s) = floor(sum(x) / vth + 1 - threshold): with threshold = 1/2
    that is round-half-up(sum(x) / vth), with threshold = 1 (SPEC's literal `v >= V_th`) floor(sum(x) / vth).
    A binary neuron (bipolar=False) rests in the same interval only if its inputs are >= 0. With the input
    delivered at the first step it fires once per step until it rests, so over T steps
        sum(s) = clamp(floor(x / vth + 1 - threshold), -T, T)    (binary: clamp to [0, T]; no spike for x < 0).
    torch.round (half to even) agrees with threshold = 1/2 except at x / vth = n + 1/2 with n even (n + 1 here).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold} is a fraction of vth in (0, 1]")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x [T, ...] needs at least one time step, got shape {tuple(x.shape)}")
    vth = torch.as_tensor(vth, dtype=x.dtype, device=x.device)
    v, out = torch.zeros_like(x[0]), []
    for t in range(x.shape[0]):
        v = v + x[t]                                                   # integrate
        s = (v >= threshold * vth).to(x.dtype)                         # fire
        if bipolar:
            s = s - (v < (threshold - 1) * vth).to(x.dtype)
        v = v - s * vth                                                # soft reset: keep the remainder
        out.append(s)
    return torch.stack(out), v


# ----------------------------------------------------------------------------- energy

# pJ per operation at 45 nm, as the report (§5.5) takes them from Yao et al. 2024
E_FP16_MAC, E_INT8_MAC, E_INT8_ADD = 1.5, 0.23, 0.03


def energy(macs, spike_adds, e_fp16=E_FP16_MAC, e_int8=E_INT8_MAC, e_add=E_INT8_ADD):
    """Energy of the counted linear-layer work, dense vs event-driven.

    macs: multiply-accumulates of the dense layers (tokens * in * out summed over layers); spike_adds: weight
    additions the spikes trigger (each spike event of an input channel adds one INT8 weight into each of the
    layer's `out` accumulators). Per MAC this is the report's E = spikes per channel * E_add.
    Returns pJ totals and savings (fractions) of the spiking scheme vs FP16 and vs INT8 MACs.
    """
    if macs <= 0:
        raise ValueError("no multiply-accumulates were counted: run a forward inside collect_stats first")
    fp16, int8, spiking = macs * e_fp16, macs * e_int8, spike_adds * e_add
    return dict(fp16_pj=fp16, int8_pj=int8, spiking_pj=spiking,
                saving_vs_fp16=1 - spiking / fp16, saving_vs_int8=1 - spiking / int8)


# ----------------------------------------------------------------------------- statistics by forward hooks

@dataclass
class LayerStats:
    """Running totals for one linear layer's input counts (plain ints: nothing lives on the module)."""
    in_features: int
    out_features: int
    hist: torch.Tensor              # |count| histogram, bins 0 .. hist_max, the last one holds >= hist_max
    calls: int = 0
    entries: int = 0                # tokens x input channels
    silent: int = 0                 # entries whose count is 0: no spike in any coding
    spikes: int = 0                 # spike events in the full-length (exact) coding
    step_slots: int = 0             # entries x steps of each call's full-length coding
    window_zeros: int = 0           # zero entries of the `window`-step train (counts saturated into it)

    def metrics(self, window):
        n = max(self.entries, 1)
        return dict(entries=self.entries,
                 sparsity=self.window_zeros / max(self.entries * window, 1),
                 spikes_per_channel=self.spikes / n,
                 silent=self.silent / n,
                 firing_rate=self.spikes / max(self.step_slots, 1),
                 share_le7=float(self.hist[:8].sum()) / n,
                 share_gt16=float(self.hist[17:].sum()) / n,
                 macs=self.entries * self.out_features,
                 spike_adds=self.spikes * self.out_features)


@dataclass
class SpikeStats:
    """Statistics of every hooked layer; `layers()` per layer, `summary()` over all of them."""
    coding: str = "bidirectional"
    window: int = 3
    hist_max: int = 64
    per_layer: dict = field(default_factory=dict)

    def add(self, name, module, counts):
        """Fold one call's counts [..., in] of `module` into the totals."""
        st = self.per_layer.get(name)
        if st is None:
            st = self.per_layer[name] = LayerStats(module.in_features, module.out_features,
                                                   torch.zeros(self.hist_max + 1, dtype=torch.int64))
        c = counts.to(torch.int64)
        steps = default_steps(self.coding, c)
        st.calls += 1
        st.entries += c.numel()
        st.silent += int((c == 0).sum())
        st.spikes += int(spike_events(c, self.coding, steps).sum())
        st.step_slots += c.numel() * steps
        st.window_zeros += c.numel() * self.window - int(spike_events(c, self.coding, self.window, True).sum())
        st.hist += torch.bincount(c.abs().clamp(max=self.hist_max).flatten(), minlength=self.hist_max + 1).cpu()

    def layers(self):
        return {name: st.metrics(self.window) for name, st in self.per_layer.items()}

    def summary(self):
        """Global metrics (entry-weighted over layers), the |count| histogram and the energy estimate."""
        if not self.per_layer:
            raise ValueError("no spiking layer ran: give collect_stats a k, or set spike_k on the model")
        tot = LayerStats(0, 0, sum(st.hist for st in self.per_layer.values()))
        for st in self.per_layer.values():
            for f in ("calls", "entries", "silent", "spikes", "step_slots", "window_zeros"):
                setattr(tot, f, getattr(tot, f) + getattr(st, f))
        m = tot.metrics(self.window)
        m["macs"] = sum(st.entries * st.out_features for st in self.per_layer.values())
        m["spike_adds"] = sum(st.spikes * st.out_features for st in self.per_layer.values())
        m.update(energy(m["macs"], m["spike_adds"]))
        m["hist"] = tot.hist.tolist()
        return m


def _record(stats, name, k, module, args):
    kk = k if k is not None else module.spike_k
    if kk is None:      # a non-spiking layer has no counts to measure
        return
    with torch.no_grad():
        counts, _ = spike_quant(args[0], kk)
        stats.add(name, module, counts)


@contextmanager
def collect_stats(model, k=None, coding="bidirectional", window=3, hist_max=64):
    """Measure the spike counts entering every model.Linear / W8ASpikeLinear of `model` during any forward.

    k: threshold parameter to measure with; None uses each layer's own spike_k (layers without one are
    skipped). coding: a signed coding (activations are signed) that decides spike events and the sparsity of
    a `window`-step train (the report's 69.15% uses 3 steps; counts beyond the window saturate).
    Yields a SpikeStats; the hooks are removed on exit.
    """
    _check_coding(coding)
    if coding not in SIGNED:
        raise ValueError(f"coding {coding!r} is unsigned but activations are signed: use one of {SIGNED}")
    check_spike_k(k, "spike k")
    if not isinstance(window, int) or not 1 <= window <= MAX_BITS:
        raise ValueError(f"window={window!r}: need an int in 1..{MAX_BITS}")
    if hist_max < 17:
        raise ValueError(f"hist_max={hist_max} must be >= 17 (the summary reports the share of |count| > 16)")
    stats = SpikeStats(coding, window, hist_max)
    handles = [m.register_forward_pre_hook(partial(_record, stats, name, k))
               for name, m in model.named_modules()
               if isinstance(m, (Linear, ExpertLinear, W8ASpikeLinear, FP8SpikeLinear))]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- spike raster image

def spike_raster(train, scale=1):
    """Spike train [T, N] or [T, L, N] (steps, tokens, neurons) -> uint8 image [3, N * scale, L * T * scale].

    One row per neuron, one column per time step, token after token (token 0's T steps, then token 1's ...).
    White: no spike; black: +1; red: -1. With tokens, odd tokens' columns are light grey so boundaries show.
    For TensorBoard: writer.add_image(tag, spike_raster(train)) (dataformats CHW, the default).
    """
    if train.dim() == 2:
        train = train[:, None]
    if train.dim() != 3 or scale < 1:
        raise ValueError(f"need a train [T, N] or [T, L, N] and scale >= 1, got {tuple(train.shape)}, {scale}")
    T, L, N = train.shape
    s = train.permute(2, 1, 0).reshape(N, L * T)                       # (neuron, time)
    odd = (torch.arange(L * T, device=train.device) // T) % 2 == 1
    img = torch.full((3, N, L * T), 255, dtype=torch.uint8, device=train.device)
    img[:, :, odd] = 230
    for ch, value in enumerate((0, 0, 0)):
        img[ch][s > 0] = value
    for ch, value in enumerate((220, 0, 0)):
        img[ch][s < 0] = value
    return img.repeat_interleave(scale, 1).repeat_interleave(scale, 2).cpu()


# ----------------------------------------------------------------------------- W8ASpike

def check_group_size(group_size):
    """Input channels per INT8 weight scale: a positive int."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive int")
    return group_size


def _group(in_features, group_size):
    """Group width for a layer: group_size, or in_features for a layer narrower than one group (the GLA gate's
    16 -> kv projection: one group per row). Where group_size does not divide in_features (the demo's 688), the
    last group of each row is shorter: ceil(in / g) groups, the same INT8 symmetric scheme in each."""
    return min(in_features, check_group_size(group_size))


def _n_groups(in_features, g):
    return -(-in_features // g)


def _grouped(t, g):
    """[rows, in] -> [rows, ceil(in / g), g], the last partial group padded with zeros (which change no max|w|,
    no sum and no product)."""
    rows, in_f = t.shape
    n = _n_groups(in_f, g)
    return F.pad(t, (0, n * g - in_f)).view(rows, n, g)


def _group_width(in_features, scales, group_size):
    """The group width of a layer from its scales [out, G]: group_size checked against G, or, given None, the
    width of G equal groups (a layer with a partial group needs its group_size: several widths give G groups)."""
    n = scales.shape[-1]
    if group_size is None:
        if n < 1 or in_features % n:
            raise ValueError(f"{n} scale groups do not split in_features={in_features} evenly: pass group_size")
        return in_features // n
    g = _group(in_features, group_size)
    if _n_groups(in_features, g) != n:
        raise ValueError(f"scales hold {n} groups per row; in_features={in_features} in groups of {g} needs "
                         f"{_n_groups(in_features, g)}")
    return g


def quantize_weight(w, group_size=128, scales=None):
    """Symmetric INT8 per group of input channels: w [out, in] -> q int8 [out, in], scales float32 [out, G].

    G = ceil(in / g) groups of g = min(group_size, in) channels; the last group of a row holds the remaining
    in - (G - 1) g channels when g does not divide in. scales=None: max|w| / 127 per (row, group), so
    |w - q * s| <= s / 2. Given scales (e.g. calibrated clip ratios) are used as they are, q clamped to
    [-127, 127]. An all-zero group gets scale 1 (and q = 0). Stacked experts' weights [E, out, in] quantize the same
    (scales [E, out, G]).
    """
    if w.dim() > 2:
        q, s = quantize_weight(w.flatten(0, -2), group_size, None if scales is None else scales.flatten(0, -2))
        return q.view(w.shape), s.view(*w.shape[:-1], -1)
    out_f, in_f = w.shape
    g = _group(in_f, group_size)
    wg = _grouped(w.float(), g)
    scales = wg.abs().amax(-1) / 127 if scales is None else scales.float().to(w.device)
    if scales.shape != wg.shape[:2]:
        raise ValueError(f"scales of shape {tuple(scales.shape)}, need {tuple(wg.shape[:2])}")
    s = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(wg / s[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(out_f, -1)[:, :in_f].contiguous(), s


def dequantize_weight(q, scales, group_size=None):
    """q int8 [out, in], scales [out, G] -> float32 weight [out, in]: groups of group_size channels, the last
    one possibly shorter (None: G equal groups). Stacked [E, out, in] too."""
    if q.dim() > 2:
        return dequantize_weight(q.flatten(0, -2), scales.flatten(0, -2), group_size).view(q.shape)
    out_f, in_f = q.shape
    g = _group_width(in_f, scales, group_size)
    return (_grouped(q.float(), g) * scales.float()[..., None]).view(out_f, -1)[:, :in_f]


class W8ASpikeLinear(nn.Module):
    """Linear with INT8 group-quantized weights and spike-count inputs: y = W_q (counts * vth) + b.

    Buffers: qweight int8 [out, in], scales float32 [out, ceil(in / group_size)], bias [out] or None; the
    group width is saved beside them (extra state `<name>._extra_state`, an int64 scalar), as with a partial
    last group the scales' shape does not determine it. spike_k=None turns the input spikes off (INT8 weights,
    float activations: weight-only INT8, `quantize_int8`). Inference only. On CUDA, without gradients, the spiking
    forward multiplies int8 counts by the int8 weights on tensor cores (kernels.w8aspike_linear: exact integer
    sums, fp32 scaling), and a decode step (a few rows) reads the int8 weights and dequantizes them in registers
    (kernels.w8aspike_gemv on the spike counts, kernels.int8_gemv weight-only); elsewhere the float reference below.
    n_expert: the stacked projections of an MoE's experts (model.ExpertLinear): qweight [E, out, in], scales
    [E, out, G], no bias; forward(x, e) is expert e's.
    """

    def __init__(self, in_features, out_features, bias=True, group_size=128, spike_k=3.0, device=None, dtype=None,
                 n_expert=None):
        super().__init__()
        check_spike_k(spike_k)
        self.in_features, self.out_features, self.spike_k = in_features, out_features, spike_k
        self.group_size = _group(in_features, group_size)
        lead = () if n_expert is None else (n_expert,)
        self.register_buffer("qweight", torch.zeros(*lead, out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(*lead, out_features, _n_groups(in_features, self.group_size),
                                                  device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear, group_size=128, spike_k=3.0, scales=None):
        """From a model.Linear or a model.ExpertLinear (stacked experts)."""
        bias, w = getattr(linear, "bias", None), linear.weight
        m = cls(linear.in_features, linear.out_features, bias is not None, group_size, spike_k, device=w.device,
                dtype=w.dtype, n_expert=_n_expert(linear))
        m.qweight, m.scales = quantize_weight(w.detach(), m.group_size, scales)
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def forward(self, x, e=None):
        q, s = (self.qweight, self.scales) if e is None else (self.qweight[e], self.scales[e])
        if self.spike_k is None and kernels and kernels.use_int8_gemv(x, self.group_size):   # decode, INT8 reads
            y = kernels.int8_gemv(x.reshape(-1, self.in_features), q, s, self.group_size, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        if self.spike_k is not None and kernels and kernels.use_w8aspike_gemv(x, self.group_size, self.spike_k):
            return kernels.w8aspike_gemv(x, q, s, self.group_size, self.spike_k, self.bias)
        if self.spike_k is not None and kernels and kernels.use_spike_gemm(x):   # int8 counts x int8 weights
            return kernels.w8aspike_linear(x, q, s, self.group_size, self.spike_k, self.bias)
        if self.spike_k is not None:
            counts, vth = spike_quant(x, self.spike_k)
            x = (counts * vth).to(x.dtype)
        w = dequantize_weight(q, s, self.group_size).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def get_extra_state(self):
        return torch.tensor(self.group_size)

    def set_extra_state(self, state):
        g = int(state)
        if _n_groups(self.in_features, g) != self.scales.shape[-1]:
            raise ValueError(f"saved group width {g} does not fit {self.scales.shape[-1]} scale groups of "
                             f"in_features={self.in_features}")
        self.group_size = g

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"group_size={self.group_size}, spike_k={self.spike_k}" + \
               (f", n_expert={self.qweight.shape[0]}" if self.qweight.dim() == 3 else "")


def w8aspike_reference(x, qweight, scales, bias=None, k=3.0, coding="bidirectional", group_size=None):
    """The naive twin of W8ASpikeLinear, as an event-driven chip computes it, in float64.

    x [..., in] -> counts -> spike train [T, ..., in]; per step each spike adds (or subtracts) one INT8
    weight into an integer accumulator per (output, group) - additions only -; the step's place value,
    the group scale and the token's vth multiply the sums at the end. group_size: the layer's group width
    (a partial last group needs it; None: G equal groups). Returns [..., out].
    """
    counts, vth = spike_quant(x, k)
    train = encode(counts, coding)
    out_f, in_f = qweight.shape
    g = _group_width(in_f, scales, group_size)
    cols = [slice(j, min(j + g, in_f)) for j in range(0, in_f, g)]     # the last one may be shorter
    acc = torch.zeros(*x.shape[:-1], out_f, len(cols), dtype=torch.float64, device=x.device)
    for s, p in zip(train, place_values(coding, train.shape[0]).tolist()):
        for j, c in enumerate(cols):
            acc[..., j] += p * (s[..., c].double() @ qweight[:, c].double().T)
    y = (acc * scales.double()).sum(-1) * vth.double()
    return y if bias is None else y + bias.double()


def _n_expert(linear):
    """The experts a model.ExpertLinear stacks (weight [E, out, in]); None for a model.Linear."""
    return linear.weight.shape[0] if linear.weight.dim() == 3 else None


def _linears(model):
    """The float projections quantizers replace: every model.Linear and model.ExpertLinear (stacked experts)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (Linear, ExpertLinear))]


def _swap(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def replace_linears(model, *, k=3.0, group_size=128, scales=None):
    """Swap every model.Linear and ExpertLinear (the projections of the blocks; not lm_head or the router) for a
    W8ASpikeLinear.

    k: activation threshold parameter (None: float activations). group_size: input channels per scale; the
    last group of a row is shorter where it does not divide in_features. scales: {module name: [out, G]} from
    `calibrate`; default max|w| / 127 per group. Works in place and returns the model; every layer is checked
    before any is replaced.
    """
    check_spike_k(k, "spike k")
    targets = _linears(model)
    for name, m in targets:
        g = _group(m.in_features, group_size)
        if scales is not None:
            want = (*m.weight.shape[:-1], _n_groups(m.in_features, g))
            if name not in scales or tuple(scales[name].shape) != want:
                raise ValueError(f"scales for {name}: need shape {want}, got "
                                 f"{tuple(scales[name].shape) if name in scales else 'none'}")
    for name, m in targets:
        _swap(model, name, W8ASpikeLinear.from_linear(m, group_size, k, None if scales is None else scales[name]))
    if isinstance(getattr(model, "config", None), Config):
        model.config.spike_k = k   # saved with the checkpoint: the activation k of the quantized layers
    return model


QUANTIZED = {"qweight": "W8ASpike", "fp8_weight": "FP8"}   # a quantized layer's weight buffer -> its format


def quantized_format(state):
    """'W8ASpike' or 'FP8' when the projections are quantized layers, else None (float): of a model (a W8ASpike or
    FP8 checkpoint loads so), or from the tensor names of a state (a checkpoint's headers, before anything loads)."""
    names = state.state_dict() if isinstance(state, nn.Module) else state
    return next((f for leaf, f in QUANTIZED.items() if any(n.endswith("." + leaf) for n in names)), None)


def _check_float(model):
    """Every quantizer starts from float projections: a model without them is refused, naming what it holds."""
    if _linears(model):
        return
    held = {"W8ASpike": "a W8ASpike checkpoint holds INT8", "FP8": "an FP8 checkpoint holds e4m3",
            None: None}[quantized_format(model)]
    raise ValueError("no float projections to quantize" +
                     (f" ({held} weights already: quantize the float checkpoint it came from)" if held else ""))


def quantize_int8(model, group_size=128):
    """INT8 weights (max|w| / 127 per group of group_size input channels) for every model.Linear, keeping the
    model's activations: weight-only INT8 for a float model (spike_k None), W8ASpike for a spiking one. The layers
    are W8ASpikeLinear (same buffers, same checkpoint format): with spike_k None their decode steps run
    kernels.int8_gemv on CUDA. In place; returns the model."""
    _check_float(model)
    config = getattr(model, "config", None)
    return replace_linears(model, k=config.spike_k if isinstance(config, Config) else None, group_size=group_size)


CLIP_GRID = tuple(1 - 0.05 * i for i in range(11))   # scale = a * max|w| / 127, a = 1.0, 0.95, ..., 0.5


def search_scales(w, sq, group_size=128, grid=CLIP_GRID):
    """Per (row, group), the scale a * max|w| / 127 (a in grid) minimizing sum_i sq_i (w_i - q_i s)^2.

    w [out, in]; sq [in]: sum of squared inputs per channel (the output error's weight). Ties keep the
    earlier grid entry, so with 1.0 first an unused channel group keeps the max scale. -> float32 [out, G]
    (groups as quantize_weight).
    """
    if not grid or min(grid) <= 0:
        raise ValueError(f"grid {grid!r} must be non-empty and positive")
    g = _group(w.shape[1], group_size)
    wg, h = _grouped(w.float(), g), _grouped(sq.float().to(w.device).view(1, -1), g)
    base = wg.abs().amax(-1) / 127
    best, best_err = None, None
    for a in grid:
        q, s = quantize_weight(w, g, a * base)
        err = (h * (wg - _grouped(dequantize_weight(q, s, g), g)) ** 2).sum(-1)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


@torch.no_grad()
def calibrate(model, batches, *, n_samples=128, k=3.0, group_size=128, grid=CLIP_GRID):
    """Calibrated W8ASpike scales: run the first n_samples rows of `batches` (token ids [B, T] each) through
    the float model with spikes at k, record per layer the squared spiked inputs per channel, and pick each
    group's clip ratio by `search_scales`. Returns {module name: scales} for replace_linears(scales=...).

    One pass, no error feedback (GPTQ, which the release used, also updates the remaining weights).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be >= 1")
    check_spike_k(k, "spike k")
    if not grid or min(grid) <= 0:
        raise ValueError(f"grid {grid!r} must be non-empty and positive")
    targets = _linears(model)
    if not targets:
        raise ValueError("the model has no model.Linear to calibrate (already replaced?)")
    check_group_size(group_size)   # a bad group_size fails before the forward passes
    # per input channel (and per expert of stacked experts, whose forward gets (x, e))
    sq = {name: torch.zeros(*m.weight.shape[:-2], m.in_features, dtype=torch.float64, device=m.weight.device)
          for name, m in targets}

    def record(name, module, args):
        x = args[0] if k is None else spike(args[0], k)
        at = sq[name] if len(args) == 1 else sq[name][args[1]]
        at += x.double().pow(2).flatten(0, -2).sum(0)

    saved = [(m, m.spike_k) for _, m in targets]
    handles = [m.register_forward_pre_hook(partial(record, name)) for name, m in targets]
    was_training, seen = model.training, 0
    model.eval()
    try:
        for m, _ in saved:
            m.spike_k = k
        device = targets[0][1].weight.device
        for idx in batches:
            idx = idx[: n_samples - seen]
            if idx.shape[0]:
                model(idx.to(device))
                seen += idx.shape[0]
            if seen >= n_samples:
                break
    finally:
        for h in handles:
            h.remove()
        for m, old in saved:
            m.spike_k = old
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibrate got no data: `batches` yielded no rows of token ids")

    def scales(w, sq):   # stacked experts: each its own search
        return search_scales(w, sq, group_size, grid) if w.dim() == 2 else torch.stack(list(map(scales, w, sq)))
    return {name: scales(m.weight.detach(), sq[name]) for name, m in targets}


# ----------------------------------------------------------------------------- FP8: spike counts x e4m3 weights

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max   # 448, e4m3's largest finite value


def quantize_weight_fp8(w):
    """Per output channel to e4m3: w [out, in] -> (bits uint8 [out, in], scales float32 [out]), scale = max|w| / 448,
    the e4m3 value (bits.view(torch.float8_e4m3fn)) = w / scale rounded to 4 significant bits: |w - q s| <= |w| / 16
    (plus e4m3's subnormal step, 2^-9 s, near 0). An all-zero row gets scale 1. The bits are stored as uint8 so that
    a module.to(dtype) never converts them."""
    w = w.detach().float()
    s = w.abs().amax(-1) / FP8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = (w / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8), s


def dequantize_weight_fp8(bits, scales):
    """(bits uint8 [out, in], scales [out]) -> float32 weight [out, in] (stacked [E, out, in] too)."""
    return bits.view(torch.float8_e4m3fn).float() * scales.float()[..., None]


def fp8_counts(counts):
    """The counts as FP8SpikeLinear multiplies them, float32: rounded to e4m3 (exact up to +-16, 4 significant bits
    beyond), but a row holding a count past 448 (e4m3's largest) keeps its exact counts (the fast path sends such
    rows to its float path)."""
    wide = counts.abs().amax(-1, keepdim=True) > FP8_MAX
    return torch.where(wide, counts, counts.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float())


class FP8SpikeLinear(nn.Module):
    """Linear with e4m3 weights (one scale per output channel) and spike-count inputs taken as e4m3:
    y = (W8 * scales) (e4m3(counts) * vth) + b. Buffers: fp8_weight uint8 [out, in] (e4m3 bits), scales float32
    [out], bias [out] or None. Inference only. On CUDA, without gradients, a decode step (at most
    kernels.INT8_GEMV_MAX_ROWS rows) runs kernels.fp8_gemv (capability >= 8.0: reads the e4m3 bytes, converts them in
    registers, no host sync); more rows run on FP8 tensor cores (capability >= 8.9: kernels.spike_linear_fp8,
    torch._scaled_mm with vth and the scales as row and column scales); elsewhere the float reference below, on the
    same quantized operands. n_expert: stacked experts as W8ASpikeLinear's (fp8_weight [E, out, in], scales
    [E, out]; forward(x, e))."""

    def __init__(self, in_features, out_features, bias=True, spike_k=3.0, device=None, dtype=None, n_expert=None):
        super().__init__()
        if spike_k is None:
            raise ValueError("FP8SpikeLinear multiplies spike counts: it needs a spike k > 0")
        check_spike_k(spike_k)
        self.in_features, self.out_features, self.spike_k = in_features, out_features, spike_k
        lead = () if n_expert is None else (n_expert,)
        self.register_buffer("fp8_weight", torch.zeros(*lead, out_features, in_features, dtype=torch.uint8,
                                                       device=device))
        self.register_buffer("scales", torch.ones(*lead, out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear, spike_k=3.0):
        """From a model.Linear or a model.ExpertLinear (stacked experts)."""
        bias, w = getattr(linear, "bias", None), linear.weight
        m = cls(linear.in_features, linear.out_features, bias is not None, spike_k, device=w.device, dtype=w.dtype,
                n_expert=_n_expert(linear))
        m.fp8_weight, m.scales = quantize_weight_fp8(w)
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def forward(self, x, e=None):
        q, s = (self.fp8_weight, self.scales) if e is None else (self.fp8_weight[e], self.scales[e])
        if kernels and kernels.use_fp8_gemv(x, self.spike_k):   # decode: e4m3 bytes in registers, no host sync
            return kernels.fp8_gemv(x, q, s, self.spike_k, self.bias)
        if kernels and kernels.use_spike_fp8(x):   # e4m3 counts x e4m3 weights, torch._scaled_mm
            return kernels.spike_linear_fp8(x, q.view(torch.float8_e4m3fn), s, self.spike_k, self.bias)
        counts, vth = spike_quant(x, self.spike_k)
        xq = (fp8_counts(counts) * vth).to(x.dtype)
        w = dequantize_weight_fp8(q, s).to(x.dtype)
        return F.linear(xq, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, spike_k={self.spike_k}, e4m3" + \
               (f", n_expert={self.fp8_weight.shape[0]}" if self.fp8_weight.dim() == 3 else "")


def replace_linears_fp8(model, *, k=3.0):
    """Swap every model.Linear (the projections of the blocks, as replace_linears) for an FP8SpikeLinear with spike
    activations at k (required: FP8 here multiplies spike counts). In place; returns the model."""
    if k is None:
        raise ValueError("FP8 layers multiply spike counts: give a spike k > 0 (generate.py --spike K)")
    check_spike_k(k, "spike k")
    _check_float(model)
    for name, m in _linears(model):
        _swap(model, name, FP8SpikeLinear.from_linear(m, k))
    if isinstance(getattr(model, "config", None), Config):
        model.config.spike_k = k
    return model


# ----------------------------------------------------------------------------- a saved quantized model's modules

def replace_linears_for_state(model, state, k=3.0):
    """Swap each model.Linear whose entries in `state` are a quantized layer's for that layer, so that
    model.load_state_dict(state) fits; the other layers stay. `<name>.qweight`: a W8ASpikeLinear (activation k) of
    the saved group width, which is the layer's `._extra_state`; states without one (saved before partial groups
    existed) have equal groups, and the scales' shape gives it (added to state). `<name>.fp8_weight`: an
    FP8SpikeLinear at k (k None is an error: its inputs are spike counts). Under torch.device("meta") nothing is
    allocated, so a saved FP8 or INT8 model loads without a float copy of its projections. Returns the model.
    """
    for name, m in _linears(model):
        bias = getattr(m, "bias", None) is not None
        n_expert = _n_expert(m)
        if name + ".fp8_weight" in state:
            if k is None:
                raise ValueError(f"{name} holds FP8 weights, which multiply spike counts: the config needs a spike_k")
            _swap(model, name, FP8SpikeLinear(m.in_features, m.out_features, bias, k, n_expert=n_expert))
            continue
        if name + ".qweight" not in state:
            continue
        if name + "._extra_state" not in state and name + ".scales" in state:
            g = _group_width(m.in_features, state[name + ".scales"], None)
            state[name + "._extra_state"] = torch.tensor(g, device="cpu")   # a value, even under the meta device
        g = int(state.get(name + "._extra_state", m.in_features))   # missing: the caller's shape check names it
        _swap(model, name, W8ASpikeLinear(m.in_features, m.out_features, bias, g, k, n_expert=n_expert))
    return model

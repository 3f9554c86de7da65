"""spiking.py: hand-computed thresholds and codings, round trips, the integrate-and-fire statement, statistics,
energy arithmetic, rasters, W8ASpike (and its checkpoints, through convert.load_checkpoint), FP8SpikeLinear, a
spiking tiny model that trains and generates. The commands that use it are tested in test_convert.py (w8aspike) and test_eval.py.

Every expected number is worked out by hand (in the comments) or by an independent float64 computation.
"""
import math
import os
import re
from functools import partial

import pytest
import torch

import convert
from convert import load_checkpoint
from model import GPT, Config, Linear
from spiking import (FP8SpikeLinear, W8ASpikeLinear, calibrate, coding_range, collect_stats, decode, default_steps,
                     dequantize_weight_fp8, encode, energy, fp8_counts, if_neuron, quantize_int8, quantize_weight,
                     quantize_weight_fp8, quantized_format, replace_linears, replace_linears_fp8,
                     replace_linears_for_state, search_scales, spike, spike_events, spike_quant, spike_raster,
                     w8aspike_reference)

T_ = torch.tensor


# ----------------------------------------------------------------------------- threshold

def test_threshold_hand_examples():
    # mean|x| = (1 + 2 + 3 + 6) / 4 = 3, vth = 3 / 3 = 1
    counts, vth = spike_quant(T_([[1.0, -2.0, 3.0, -6.0]]), k=3.0)
    assert torch.equal(counts, T_([[1.0, -2.0, 3.0, -6.0]])) and torch.equal(vth, T_([[1.0]]))
    # mean|x| = 8.5 / 4 = 2.125, vth = 2.125 / 2 = 1.0625; x / vth = 8/17, 24/17, 40/17, -64/17
    counts, vth = spike_quant(T_([0.5, 1.5, 2.5, -4.0]), k=2.0)
    assert torch.equal(counts, T_([0.0, 1.0, 2.0, -4.0])) and vth.item() == 1.0625
    # clamps: all-zero token -> vth 1e-5; mean 3e5 / 3 = 1e5 -> 1e4, counts 3e5 / 1e4 = 30
    counts, vth = spike_quant(torch.zeros(2, 3))
    assert torch.equal(counts, torch.zeros(2, 3)) and torch.allclose(vth, torch.full((2, 1), 1e-5))
    counts, vth = spike_quant(T_([3e5, -3e5]), k=3.0)
    assert torch.equal(counts, T_([30.0, -30.0])) and vth.item() == 1e4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_threshold_dtypes_and_leading_shapes(dtype):
    x = T_([1.0, -2.0, 3.0, -6.0]).to(dtype).expand(2, 3, 4)   # exact in every dtype
    counts, vth = spike_quant(x, k=3.0)
    assert counts.dtype == torch.float32 and counts.shape == (2, 3, 4) and vth.shape == (2, 3, 1)
    assert torch.equal(counts, T_([1.0, -2.0, 3.0, -6.0]).expand(2, 3, 4))


def test_threshold_bad_k():
    for k in (0, -1.0):
        with pytest.raises(ValueError, match="k"):
            spike_quant(torch.ones(4), k)


def test_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 16, dtype=torch.float64)
    y = spike(x, 3.0)
    (y * g).sum().backward()
    assert torch.equal(x.grad, g)
    counts, vth = spike_quant(x.detach(), 3.0)
    assert torch.equal(y.detach(), (counts * vth).double())


# ----------------------------------------------------------------------------- codings

HAND = [  # coding, counts, expected train [steps, n] (default steps)
    ("binary", [3, 0, 1], [[1, 0, 1], [1, 0, 0], [1, 0, 0]]),
    ("ternary", [-2, 1, 0], [[-1, 1, 0], [-1, 0, 0]]),
    ("bitwise", [5, 2], [[1, 0], [0, 1], [1, 0]]),                       # 101, 010
    ("bidirectional", [-5, 3], [[-1, 0], [0, 1], [-1, 1]]),              # -(101), 011
    ("twos", [-5, 5], [[1, 0], [0, 1], [1, 0], [1, 1]]),                 # 1011 = 16 - 5, 0101
]


@pytest.mark.parametrize("coding,counts,train", HAND)
def test_coding_hand_examples(coding, counts, train):
    got = encode(T_(counts, dtype=torch.float32), coding)
    assert got.dtype == torch.float32 and torch.equal(got, T_(train, dtype=torch.float32))
    assert torch.equal(decode(got, coding), T_(counts))


def test_default_steps_and_ranges():
    assert default_steps("binary", T_([3, 0, 1])) == 3
    assert default_steps("ternary", T_([-4, 1])) == 4
    assert default_steps("bitwise", T_([0])) == 1 and default_steps("bitwise", T_([4])) == 3
    assert default_steps("bidirectional", T_([-7])) == 3 and default_steps("bidirectional", T_([-8])) == 4
    # twos: max(2, bits(max|s|) + 1): 0 -> 2, 1 -> 2, 7 -> 4, -8 -> 5 (one more than needed, as the release)
    assert [default_steps("twos", T_([v])) for v in (0, 1, 7, -8)] == [2, 2, 4, 5]
    assert coding_range("binary", 3) == (0, 3) and coding_range("ternary", 3) == (-3, 3)
    assert coding_range("bitwise", 3) == (0, 7) and coding_range("bidirectional", 3) == (-7, 7)
    assert coding_range("twos", 3) == (-4, 3)
    assert torch.equal(encode(T_([0]), "bidirectional"), T_([[0.0]]))
    assert torch.equal(encode(T_([-4, 3]), "twos", steps=3), T_([[1.0, 0], [0, 1], [0, 1]]))   # 100, 011


@pytest.mark.parametrize("coding,counts,steps,clamped,train", [
    ("binary", [5], 2, [2], [[1], [1]]),
    ("binary", [-1], 2, [0], [[0], [0]]),                   # unsigned: negatives saturate to 0
    ("ternary", [4, -4], 2, [2, -2], [[1, -1], [1, -1]]),
    ("bitwise", [5], 2, [3], [[1], [1]]),
    ("bidirectional", [-9], 2, [-3], [[-1], [-1]]),
    ("twos", [9, -9], 3, [3, -4], [[0, 1], [1, 0], [1, 0]]),  # 011, 100
])
def test_saturation(coding, counts, steps, clamped, train):
    c = T_(counts, dtype=torch.float32)
    with pytest.raises(ValueError, match="saturate"):
        encode(c, coding, steps=steps)
    got = encode(c, coding, steps=steps, saturate=True)
    assert torch.equal(got, T_(train, dtype=torch.float32)) and torch.equal(decode(got, coding), T_(clamped))


@pytest.mark.parametrize("coding", ["binary", "ternary", "bitwise", "bidirectional", "twos"])
def test_round_trip(coding):
    g = torch.Generator().manual_seed(1)
    signed = coding in ("ternary", "bidirectional", "twos")
    c = torch.randint(-300 if signed else 0, 301, (7, 33), generator=g)
    assert torch.equal(decode(encode(c, coding), coding), c)            # default steps
    for steps in (1, 2, 3, 5, 9):
        lo, hi = coding_range(coding, steps)
        c = torch.randint(lo, hi + 1, (64,), generator=g)
        train = encode(c.float(), coding, steps=steps)
        assert train.shape == (steps, 64) and torch.equal(decode(train, coding), c)
        assert torch.equal(spike_events(c, coding, steps), train.ne(0).sum(0))


def test_spike_events_match_trains():
    c = torch.randint(-40, 41, (5, 17), generator=torch.Generator().manual_seed(2))
    for coding in ("ternary", "bidirectional", "twos"):
        assert torch.equal(spike_events(c, coding), encode(c, coding).ne(0).sum(0))
        assert torch.equal(spike_events(c, coding, 3, saturate=True), encode(c, coding, 3, saturate=True).ne(0).sum(0))


def test_coding_bad_input():
    with pytest.raises(ValueError, match="integer-valued"):
        encode(T_([1.5]), "ternary")
    with pytest.raises(ValueError, match="integer-valued"):
        encode(T_([float("nan")]), "ternary")
    with pytest.raises(ValueError, match="unknown coding"):
        encode(T_([1]), "unary")
    with pytest.raises(ValueError, match=r"\[0, 3\].*steps >= 4"):    # 10 needs 4 bits
        encode(T_([10]), "bitwise", steps=2)
    with pytest.raises(ValueError, match="steps"):
        encode(T_([1]), "bitwise", steps=0)
    with pytest.raises(ValueError, match="steps"):
        encode(T_([1]), "bidirectional", steps=63)
    with pytest.raises(ValueError, match="holds only"):
        decode(T_([[1.0], [-1.0]]), "binary")
    with pytest.raises(ValueError, match="holds only"):
        decode(T_([[0.5]]), "ternary")


# ----------------------------------------------------------------------------- integrate-and-fire

def _first_step(r, steps, vth=0.5):
    """Input r * vth at the first step, nothing after: x [steps, len(r)] float64 (dyadic values: exact)."""
    x = torch.zeros(steps, len(r), dtype=torch.float64)
    x[0] = T_(r, dtype=torch.float64) * vth
    return x


def test_if_neuron_rounds_half_up():
    r = [i / 4 for i in range(0, 25)]                                  # 0, 0.25, ..., 6
    spikes, v = if_neuron(_first_step(r, 8), 0.5)
    assert spikes.sum(0).tolist() == [math.floor(x + 0.5) for x in r]
    assert (v >= -0.25).all() and (v < 0.25).all()                     # rest interval [-vth/2, vth/2)
    # vs torch.round (half to even): equal except at n + 1/2 with n even
    tr = torch.round(T_(r, dtype=torch.float64))
    diff = {x for x, a, b in zip(r, spikes.sum(0).tolist(), tr.tolist()) if a != b}
    assert diff == {0.5, 2.5, 4.5}
    assert spikes.sum(0)[[2, 6, 9, 10, 11]].tolist() == [1, 2, 2, 3, 3]   # 0.5, 1.5, 2.25, 2.5, 2.75
    # one spike per step from the first: r = 3 over 5 steps
    assert if_neuron(_first_step([3.0], 5), 0.5)[0][:, 0].tolist() == [1, 1, 1, 0, 0]


def test_if_neuron_negative_inputs_and_short_windows():
    r = [-2.75, -2.5, -2.25, -1.5, -0.5, -0.25]
    # a binary neuron never fires for x < 0
    assert if_neuron(_first_step(r, 8), 0.5)[0].abs().sum().item() == 0
    # a bipolar neuron rounds half up on both signs: floor(r + 1/2)
    spikes, v = if_neuron(_first_step(r, 8), 0.5, bipolar=True)
    assert spikes.sum(0).tolist() == [-3, -2, -2, -1, 0, 0]
    assert set(spikes.flatten().tolist()) <= {-1.0, 0.0}
    # T smaller than the count: clamp to [-T, T]
    assert if_neuron(_first_step([5.0], 2), 0.5)[0].sum().item() == 2
    assert if_neuron(_first_step([-5.0], 2), 0.5, bipolar=True)[0].sum().item() == -2


def test_if_neuron_literal_threshold_floors():
    # SPEC's `s = 1 if v >= V_th` (threshold 1): floor(x / vth)
    r = [0.0, 0.75, 1.0, 2.75, 3.5]
    assert if_neuron(_first_step(r, 8), 0.5, threshold=1.0)[0].sum(0).tolist() == [0, 0, 1, 2, 3]
    r = [-0.25, -1.0, -2.75]
    assert if_neuron(_first_step(r, 8), 0.5, threshold=1.0, bipolar=True)[0].sum(0).tolist() == [-1, -1, -3]


@pytest.mark.parametrize("bipolar", [False, True])
def test_if_neuron_spread_input_conserves_charge(bipolar):
    # input over 6 steps, then enough silent steps to come to rest: total = floor(sum(x) / vth + 1/2)
    g = torch.Generator().manual_seed(3)
    lo = -12 if bipolar else 0
    q = torch.randint(lo, 13, (6, 50), generator=g).double() / 4      # multiples of 1/4: exact
    x = torch.cat([q * 0.5, torch.zeros(30, 50, dtype=torch.float64)])   # vth 0.5; |sum| <= 18 vth
    spikes, v = if_neuron(x, 0.5, bipolar=bipolar)
    want = [math.floor(s + 0.5) for s in q.sum(0).tolist()]
    assert spikes.sum(0).tolist() == want
    assert torch.equal(v, x.sum(0) - 0.5 * spikes.sum(0))              # soft reset keeps all charge


def test_if_neuron_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        if_neuron(torch.zeros(2, 1), 1.0, threshold=0.0)


# ----------------------------------------------------------------------------- statistics

class _One(torch.nn.Module):
    def __init__(self, k=3.0):
        super().__init__()
        self.lin = Linear(4, 3, bias=False)
        self.lin.spike_k = k

    def forward(self, x):
        return self.lin(x)


# both tokens have mean|x| = 3, so vth = 1 and the counts are the inputs themselves
X = T_([[1.0, -2.0, 3.0, -6.0], [4.0, 0.0, -1.0, 7.0]])


def test_statistics_hand_example():
    m = _One()
    before = set(vars(m.lin))
    with collect_stats(m, window=3) as st:
        m(X)
    s = st.layers()["lin"]
    # bidirectional spikes = popcount |c|: 1,1,2,2 (1,2,3,6) + 1,0,1,3 (4,0,1,7) = 11 over 8 entries
    assert s["entries"] == 8 and s["spikes_per_channel"] == 11 / 8 and s["silent"] == 1 / 8
    assert s["sparsity"] == (24 - 11) / 24                              # 3-step window, all |c| <= 7
    assert s["firing_rate"] == 11 / 24                                  # full length: 3 steps (max 7)
    assert s["share_le7"] == 1.0 and s["share_gt16"] == 0.0
    assert s["macs"] == 2 * 4 * 3 and s["spike_adds"] == 11 * 3
    tot = st.summary()
    assert tot["hist"][:9] == [1, 2, 1, 1, 1, 0, 1, 1, 0] and sum(tot["hist"]) == 8
    # energy: FP16 24 * 1.5 = 36 pJ, INT8 24 * 0.23 = 5.52 pJ, spiking 33 * 0.03 = 0.99 pJ
    assert tot["saving_vs_fp16"] == pytest.approx(1 - 0.99 / 36, abs=1e-12)
    assert tot["saving_vs_int8"] == pytest.approx(1 - 0.99 / 5.52, abs=1e-12)
    # hooks gone, nothing left on the module
    assert not m.lin._forward_pre_hooks and set(vars(m.lin)) == before


def test_statistics_window_and_codings():
    m = _One()
    with collect_stats(m, window=2) as st:
        m(X)
        m(X)                                                            # a second call doubles the totals
    s = st.layers()["lin"]
    # counts saturated to [-3, 3]: 1,-2,3,-3 / 3,0,-1,3 -> spikes 1,1,2,2 / 2,0,1,2 = 11 of 16 slots
    assert s["entries"] == 16 and s["sparsity"] == 5 / 16
    with collect_stats(m, coding="ternary", window=3) as st:
        m(X)
    s = st.layers()["lin"]
    # ternary: |c| spikes, 1+2+3+6+4+0+1+7 = 24; full length 7 steps; window 3: 1,2,3,3,3,0,1,3 = 16
    assert s["spikes_per_channel"] == 3.0 and s["firing_rate"] == 24 / 56 and s["sparsity"] == 8 / 24
    with collect_stats(m, coding="twos", window=3) as st:
        m(X)
    s = st.layers()["lin"]
    # 4-bit two's complement: 0001 1110 0011 1010 / 0100 0000 1111 0111 -> 1+3+2+2 + 1+0+4+3 = 16
    # 3-bit window, saturated to [-4, 3]: 001 110 011 100 / 011 000 111 011 -> 1+2+2+1 + 2+0+3+2 = 13
    assert s["spikes_per_channel"] == 16 / 8 and s["firing_rate"] == 16 / 32 and s["sparsity"] == 11 / 24


def test_statistics_on_tiny_model():
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny")).eval()
    idx = torch.randint(0, 512, (2, 24))
    with collect_stats(model) as st:                                    # spiking is off: nothing to measure
        model(idx)
    with pytest.raises(ValueError, match="no spiking layer"):
        st.summary()
    with collect_stats(model, k=3.0) as st:
        model(idx)
    # 2 GLA layers x (q, k, v, o, gk_proj.0, gk_proj.1, gate, up, down) + 2 SWA layers x 7
    assert len(st.layers()) == 2 * 9 + 2 * 7
    assert all(s["entries"] > 0 and 0 <= s["sparsity"] <= 1 for s in st.layers().values())
    assert "lm_head" not in st.layers()
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_statistics_bad_input():
    m = _One()
    for kw, msg in [(dict(k=0), "k"), (dict(coding="binary"), "unsigned"), (dict(window=0), "window"),
                    (dict(hist_max=8), "hist_max")]:
        with pytest.raises(ValueError, match=msg):
            with collect_stats(m, **kw):
                pass


# ----------------------------------------------------------------------------- energy

def test_energy_reproduces_the_report():
    # report §5.5: 1.13 spikes per channel, 0.03 pJ per INT8 add -> 0.0339 pJ per MAC (written "about 0.034")
    e = energy(1.0, 1.13)
    assert e["spiking_pj"] == pytest.approx(0.0339, abs=1e-15)
    assert e["saving_vs_fp16"] == pytest.approx(1 - 0.0339 / 1.5, abs=1e-12)     # 0.97740
    assert e["saving_vs_int8"] == pytest.approx(1 - 0.0339 / 0.23, abs=1e-12)    # 0.852609
    assert round(100 * e["saving_vs_fp16"], 1) == 97.7
    # the report's 85.2% comes from its rounded 0.034 pJ (1 - 0.034 / 0.23 = 0.85217);
    # the unrounded 0.0339 pJ gives 85.26%, i.e. 85.3%
    assert round(100 * e["saving_vs_int8"], 1) == 85.3
    e = energy(1.0, 0.034 / 0.03)
    assert round(100 * e["saving_vs_fp16"], 1) == 97.7 and round(100 * e["saving_vs_int8"], 1) == 85.2
    # totals: 1000 MACs, 300 spike additions
    e = energy(1000, 300)
    assert (e["fp16_pj"], e["int8_pj"]) == (1500.0, 230.0) and e["spiking_pj"] == pytest.approx(9.0)
    with pytest.raises(ValueError, match="multiply-accumulates"):
        energy(0, 0)


# ----------------------------------------------------------------------------- raster

def test_raster_pixels():
    img = spike_raster(T_([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]))       # 2 steps x 3 neurons
    assert img.dtype == torch.uint8 and img.shape == (3, 3, 2)
    assert img[0].tolist() == [[0, 255], [255, 0], [220, 255]]         # red channel
    assert img[1].tolist() == [[0, 255], [255, 0], [0, 255]] and torch.equal(img[1], img[2])
    img = spike_raster(T_([[[1.0], [0.0]]]), scale=2)                  # 1 step, 2 tokens, 1 neuron
    assert img.shape == (3, 2, 4) and img[0, 0].tolist() == [0, 0, 230, 230]   # odd token shaded


# ----------------------------------------------------------------------------- W8ASpike

def test_group_quantization_hand_example():
    w = T_([[1.27, -0.634, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_weight(w, group_size=4)
    # group 0: scale 1.27 / 127 = 0.01, q = 127, -63.4 -> -63, 30, 0; group 1 is all zero: scale 1, q 0
    assert q.dtype == torch.int8 and q.tolist() == [[127, -63, 30, 0, 0, 0, 0, 0]]
    assert s.shape == (1, 2) and s[0, 0].item() == pytest.approx(0.01, rel=1e-6) and s[0, 1].item() == 1.0


def test_group_quantization_error_bound():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.rand(16, 1) * 3
    q, s = quantize_weight(w, group_size=32)
    assert s.shape == (16, 2)
    err = (w.double().view(16, 2, 32) - q.double().view(16, 2, 32) * s.double()[..., None]).abs()
    assert (err <= s.double()[..., None] / 2 * (1 + 1e-6)).all()
    assert q.abs().max() == 127 and (q.view(16, 2, 32).abs().amax(-1) == 127).all()
    # a layer narrower than the group is one group per row; a bad group size is an error
    assert quantize_weight(torch.randn(2, 16), 128)[1].shape == (2, 1)
    with pytest.raises(ValueError, match="positive int"):
        quantize_weight(torch.randn(4, 200), 0)


def test_partial_group_hand_example():
    # 6 channels in groups of 4: the second group holds the last 2 channels
    w = T_([[0.5, -1.27, 0.2, 0.3, 2.54, -1.0]])
    q, s = quantize_weight(w, group_size=4)
    # group 0: scale 1.27 / 127 = 0.01, q = 50, -127, 20, 30; group 1: scale 2.54 / 127 = 0.02, q = 127, -50
    assert q.tolist() == [[50, -127, 20, 30, 127, -50]] and q.is_contiguous()
    assert s.shape == (1, 2) and s[0].tolist() == pytest.approx([0.01, 0.02], rel=1e-6)


@pytest.mark.parametrize("in_f", [688, 16])   # the demo's MLP width (5 groups of 128 and one of 48); the gate rank
def test_w8aspike_partial_groups_match_float64(in_f):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, 24)
    m = W8ASpikeLinear.from_linear(lin, group_size=128, spike_k=3.0)
    G = math.ceil(in_f / 128)
    assert m.group_size == min(in_f, 128) and m.qweight.shape == (24, in_f) and m.scales.shape == (24, G)
    for j in range(G):                        # each group is quantized on its own, as a layer of its width
        c = slice(128 * j, min(128 * j + 128, in_f))
        q, s = quantize_weight(lin.weight.detach()[:, c], 128)
        assert torch.equal(m.qweight[:, c], q) and torch.equal(m.scales[:, j:j + 1], s)
    # float64: each INT8 weight times its group's scale, times the spike counts * vth
    w = m.qweight.double() * m.scales.double()[:, torch.arange(in_f) // 128]
    assert ((lin.weight.double() - w).abs() <= m.scales.double()[:, torch.arange(in_f) // 128] / 2 * (1 + 1e-6)).all()
    x = torch.randn(2, 5, in_f, dtype=torch.float64)
    counts, vth = spike_quant(x, 3.0)
    ref = (counts.double() * vth.double()) @ w.T + lin.bias.double()
    assert torch.allclose(m(x), ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(w8aspike_reference(x, m.qweight, m.scales, m.bias, 3.0, group_size=128), ref,
                          rtol=1e-6, atol=1e-6)
    if in_f == 688:   # 6 scales per row fit groups of 115 .. 137: the width must be given
        with pytest.raises(ValueError, match="pass group_size"):
            w8aspike_reference(x, m.qweight, m.scales, m.bias, 3.0)


@pytest.mark.parametrize("coding", ["bidirectional", "ternary", "twos"])
def test_w8aspike_linear_matches_event_driven_reference(coding):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    m = W8ASpikeLinear.from_linear(lin, group_size=16, spike_k=3.0)
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    ref = w8aspike_reference(x, m.qweight, m.scales, m.bias, k=3.0, coding=coding)
    assert torch.allclose(m(x), ref, rtol=1e-5, atol=1e-6)


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(Config.from_name("tiny", **kw)).eval()


def test_replace_linears_tiny_model():
    model = _tiny(spike_k=3.0)
    idx = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        ref = model(idx)[0]
        replace_linears(model, k=3.0, group_size=32)
        out = model(idx)[0]
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert sum(isinstance(m, W8ASpikeLinear) for m in model.modules()) == 32
    assert type(model.lm_head) is torch.nn.Linear and model.config.spike_k == 3.0
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99                                  # INT8 groups barely move the logits


def test_moe_model_stats_and_w8aspike():
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-moe", spike_k=3.0)).eval()
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), collect_stats(model) as st:
        model(idx)
    assert any(".experts." in n for n in st.layers()) and not any("router" in n for n in st.layers())
    with torch.no_grad():
        ref = model(idx)[0]
    scales = calibrate(model, [idx], n_samples=2, k=3.0, group_size=32)   # each expert from its own rows
    assert scales["blocks.1.mlp.experts.gate_proj"].shape == (4, 160, 2)
    replace_linears(model, k=3.0, group_size=32, scales=scales)
    assert type(model.blocks[1].mlp.router) is torch.nn.Linear
    down = model.blocks[1].mlp.experts.down_proj                     # the stacked experts: INT8 [E, out, in]
    assert isinstance(down, W8ASpikeLinear) and down.qweight.shape == (4, 64, 160) and down.scales.shape == (4, 64, 5)
    with torch.no_grad():
        out = model(idx)[0]
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_replace_linears_bad_input():
    with pytest.raises(ValueError, match="positive int"):
        replace_linears(_tiny(), group_size=0)
    model = _tiny()
    with pytest.raises(ValueError, match="k"):
        replace_linears(model, k=0)
    assert any(isinstance(m, Linear) for m in model.modules())          # nothing was replaced
    with pytest.raises(ValueError, match="scales for"):
        replace_linears(model, group_size=32, scales={})
    with pytest.raises(ValueError, match="spike_k"):
        W8ASpikeLinear(64, 8, spike_k=0.0)


def test_search_scales_against_brute_force():
    torch.manual_seed(1)
    w = torch.randn(3, 8, dtype=torch.float64)
    sq = torch.rand(8, dtype=torch.float64)
    sq[0] = 0.0
    grid = (1.0, 0.9, 0.8, 0.7, 0.6)
    got = search_scales(w.float(), sq, group_size=4, grid=grid)
    w32 = w.float().double()
    for o in range(3):
        for g in range(2):
            ws, hs = w32[o, 4 * g:4 * g + 4].tolist(), sq[4 * g:4 * g + 4].tolist()
            base = float(torch.tensor(max(abs(v) for v in ws), dtype=torch.float32) / 127)
            errs = []
            for a in grid:
                s = float(torch.tensor(a * base, dtype=torch.float32))
                errs.append(sum(h * (v - max(-127, min(127, round(v / s))) * s) ** 2 for v, h in zip(ws, hs)))
            best = grid[errs.index(min(errs))]
            assert got[o, g].item() == pytest.approx(best * base, rel=1e-6)


def test_calibrate():
    model = _tiny()
    torch.manual_seed(2)
    used = []

    def batches():
        for i in range(5):
            used.append(i)
            yield torch.randint(0, 512, (2, 16))

    scales = calibrate(model, batches(), n_samples=3, k=3.0, group_size=32)
    assert used == [0, 1]                                               # 2 + 1 rows, then it stops
    names = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    assert sorted(scales) == sorted(names)
    assert all(m.spike_k is None for m in model.modules() if isinstance(m, Linear))   # restored
    assert scales["blocks.0.mlp.down_proj"].shape == (64, 160 // 32)
    assert scales["blocks.0.attn.gk_proj.1"].shape == (32, 1)          # 16 inputs: one group
    replace_linears(model, k=3.0, group_size=32, scales=scales)
    assert torch.isfinite(model(torch.randint(0, 512, (1, 8)))[0]).all()
    with pytest.raises(ValueError, match="no data"):
        calibrate(_tiny(), [], group_size=32)
    with pytest.raises(ValueError, match="no data"):
        calibrate(_tiny(), [torch.zeros(0, 8, dtype=torch.long)], group_size=32)
    with pytest.raises(ValueError, match="positive int"):
        calibrate(_tiny(), [torch.zeros(1, 8, dtype=torch.long)], group_size=0)
    with pytest.raises(ValueError, match="k"):
        calibrate(_tiny(), [torch.zeros(1, 8, dtype=torch.long)], k=-1.0, group_size=32)


# ----------------------------------------------------------------------------- FP8: e4m3 weights, counts as e4m3

def test_fp8_weight_quantization():
    # row 0: scale 4.48 / 448 = 0.01; 4.48 -> 448, -1.0 -> -100 -> -96 (e4m3 steps by 8 there: a tie, to even),
    # 0.17 -> 17 -> 16 (steps of 2: a tie, to even); row 1 all zero: scale 1, zeros
    q, s = quantize_weight_fp8(T_([[4.48, -1.0, 0.17, 0.0], [0.0] * 4]))
    assert q.dtype == torch.uint8 and s.shape == (2,) and s[1].item() == 1.0
    assert s[0].item() == pytest.approx(0.01, rel=1e-6)
    assert q.view(torch.float8_e4m3fn).float().tolist() == [[448.0, -96.0, 16.0, 0.0], [0.0] * 4]
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.rand(16, 1) * 3
    q, s = quantize_weight_fp8(w)
    err = (w.double() - dequantize_weight_fp8(q, s).double()).abs()
    assert (err <= w.double().abs() / 16 + 2.0 ** -9 * s.double()[:, None]).all()   # 4 significant bits, subnormals
    assert (q.view(torch.float8_e4m3fn).float().abs().amax(1) == 448).all()


def test_fp8_counts_round_past_16_and_keep_wide_rows():
    c = T_([[3.0, -16.0, 17.0, -100.0, 448.0], [1.0, 2.0, 3.0, 449.0, -17.0]])
    # row 0: exact to 16, then 4 significant bits (17 -> 16, a tie to even; 100 -> 96); row 1 holds a count past
    # 448 (e4m3's largest): kept exact, the fast path's float path
    assert fp8_counts(c).tolist() == [[3.0, -16.0, 16.0, -96.0, 448.0], [1.0, 2.0, 3.0, 449.0, -17.0]]
    # past 16 the nearest e4m3 value, ties to even (README): steps of 2 to 32, 4 to 64, ..., 32 from 256 to 448
    c = T_([[17.0, 18.0, 19.0, 21.0, -23.0, 33.0, 35.0, 66.0, 300.0, 447.0]])
    assert fp8_counts(c).tolist() == [[16.0, 18.0, 20.0, 20.0, -24.0, 32.0, 36.0, 64.0, 288.0, 448.0]]


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_spike_linear_is_its_float64_twin(monkeypatch, bias):
    """FP8SpikeLinear's float reference and its forced torch._scaled_mm path (the CPU's) both equal the float64 twin
    kernels.spike_linear_fp8_torch on the same quantized operands, to float32 accumulation (the kernel test states
    the bound); among the counts some pass 16 and one row 448."""
    import kernels
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48, bias=bias)
    m = FP8SpikeLinear.from_linear(lin, 3.0)
    x = torch.randn(2, 9, 96) * torch.exp(torch.randn(2, 9, 96))
    x[1, 4, 3] = 1e4
    assert (spike_quant(x, 3.0)[0].abs() > 16).any()
    twin = kernels.spike_linear_fp8_torch(x.view(-1, 96), m.fp8_weight.view(torch.float8_e4m3fn), m.scales, 3.0,
                                          m.bias).view(2, 9, 48)
    with torch.no_grad():
        ref = m(x)
        monkeypatch.setattr(kernels, "SPIKE_FP8_IMPL", "scaled_mm")
        fast = m(x)
    for y in (ref, fast):
        assert y.dtype == torch.float32 and (y.double() - twin).abs().max() <= 1e-5 * twin.abs().max()


def test_fp8_tiny_model_runs_close_to_w8aspike(monkeypatch):
    """Every projection an FP8SpikeLinear: the logits stay close to the spiking float model's and to W8ASpike's
    (cosine > 0.98: e4m3 keeps 4 significant bits per weight, INT8 groups about 8, so FP8 moves them more); the
    forced torch._scaled_mm path gives the reference's logits (to 1e-5 of their max); the statistics hooks see the
    layers; a float model or one already quantized is refused."""
    import kernels
    idx = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    model = replace_linears_fp8(_tiny(spike_k=3.0), k=3.0)
    assert sum(isinstance(m, FP8SpikeLinear) for m in model.modules()) == 32 and model.config.spike_k == 3.0
    assert not any(isinstance(m, Linear) for m in model.modules()) and type(model.lm_head) is torch.nn.Linear
    with torch.no_grad():
        ref, w8 = _tiny(spike_k=3.0)(idx)[0], replace_linears(_tiny(spike_k=3.0), k=3.0)(idx)[0]
        out = model(idx)[0]
        with collect_stats(model) as st:
            model(idx)
        calls, real = [], torch._scaled_mm
        monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        monkeypatch.setattr(kernels, "SPIKE_FP8_IMPL", "scaled_mm")
        fast = model(idx)[0]
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos(out, ref) > 0.98 and cos(out, w8) > 0.98
    assert len(calls) == 32 and (fast - out).abs().max() <= 1e-5 * out.abs().max()
    assert len(st.layers()) == 32 and 0 < st.summary()["share_gt16"] < 0.05   # random weights: ~0.3% past 16
    with pytest.raises(ValueError, match="spike k"):
        replace_linears_fp8(_tiny(), k=None)
    with pytest.raises(ValueError, match="no float projections"):
        replace_linears_fp8(model, k=3.0)


def test_fp8_tiny_model_generates_with_cache():
    model = replace_linears_fp8(_tiny(spike_k=3.0).double(), k=3.0)   # float64: no spike flips between paths
    prompt = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert _greedy(model, prompt, 8, True) == _greedy(model, prompt, 8, False)


def test_w8aspike_save_load(tmp_path):
    model = replace_linears(_tiny(), k=3.0, group_size=32)
    idx = torch.randint(0, 512, (2, 12))
    convert.save_checkpoint(model, model.config, str(tmp_path / "q"))
    loaded, config = load_checkpoint(str(tmp_path / "q"))
    assert config.spike_k == 3.0
    m = loaded.get_submodule("blocks.1.mlp.up_proj")
    assert isinstance(m, W8ASpikeLinear) and m.qweight.dtype == torch.int8 and m.group_size == 32
    assert loaded.get_submodule("blocks.0.attn.gk_proj.1").group_size == 16
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    bf, _ = load_checkpoint(str(tmp_path / "q"), dtype=torch.bfloat16)
    assert bf.embed.weight.dtype == torch.bfloat16 and bf.get_submodule("blocks.1.mlp.up_proj").scales.dtype == torch.float32


def test_w8aspike_partial_groups_save_load(tmp_path):
    model = _tiny(intermediate_size=688)   # group 128: n_embd 64 and the gate's 16 are one group; 688 is 6
    idx = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(9))
    replace_linears(model, k=3.0, scales=calibrate(model, [idx], k=3.0))
    down = model.get_submodule("blocks.0.mlp.down_proj")
    assert down.group_size == 128 and down.scales.shape == (64, 6)
    convert.save_checkpoint(model, model.config, str(tmp_path / "q"))
    _, headers = convert.read_headers(str(tmp_path / "q"))
    assert headers["blocks.0.mlp.down_proj._extra_state"][:2] == ((), "I64")   # the group width is in the file
    loaded, _ = load_checkpoint(str(tmp_path / "q"))
    ld = loaded.get_submodule("blocks.0.mlp.down_proj")
    assert ld.group_size == 128 and torch.equal(ld.qweight, down.qweight) and torch.equal(ld.scales, down.scales)
    assert loaded.get_submodule("blocks.0.attn.gk_proj.1").group_size == 16
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_w8aspike_loads_files_without_group_width(tmp_path):
    # files written before the width was saved had equal groups only: the scales' shape gives the width
    model = replace_linears(_tiny(), k=3.0, group_size=32)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    convert.save_checkpoint(state, model.config, str(tmp_path / "old"))
    loaded, _ = load_checkpoint(str(tmp_path / "old"))
    assert loaded.get_submodule("blocks.0.mlp.down_proj").group_size == 32
    idx = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    state["blocks.0.mlp.down_proj._extra_state"] = torch.tensor(48)   # 160 / 48: 4 groups, the file holds 5
    convert.save_checkpoint(state, model.config, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=re.escape("blocks.0.mlp.down_proj.scales: file (64, 5), expected (64, 4)")):
        load_checkpoint(str(tmp_path / "bad"))


def test_replace_linears_for_state_swaps_only_the_saved_w8aspike_layers():
    quantized = replace_linears(_tiny(), k=2.0, group_size=32).state_dict()
    plain = _tiny(seed=1).state_dict()
    # block 0 as W8ASpike (block 0's down_proj without its saved width, as older files), block 1 float
    state = {k: v for k, v in quantized.items() if k.startswith("blocks.0.") and k != "blocks.0.mlp.down_proj._extra_state"}
    state.update({k: v for k, v in plain.items() if not k.startswith("blocks.0.")})
    with torch.device("meta"):
        model = replace_linears_for_state(GPT(Config.from_name("tiny")), state, k=2.0)
    assert torch.equal(state["blocks.0.mlp.down_proj._extra_state"], torch.tensor(32))   # from the scales' shape
    w8 = {n: m for n, m in model.named_modules() if isinstance(m, W8ASpikeLinear)}
    assert w8 and all(n.startswith("blocks.0.") and m.spike_k == 2.0 for n, m in w8.items())
    assert w8["blocks.0.mlp.up_proj"].group_size == 32 and w8["blocks.0.attn.gk_proj.1"].group_size == 16
    assert all(type(m) is Linear for n, m in model.named_modules() if n.startswith("blocks.1.") and "proj" in n)
    model.load_state_dict(state, assign=True)                          # every tensor has its place


def test_fp8_save_load(tmp_path):
    """An FP8 model saves as its buffers (e4m3 bits as uint8, float32 scales) and loads back as FP8SpikeLinear layers
    at the config's k: the same logits; under a dtype the bits and scales keep theirs."""
    model = replace_linears_fp8(_tiny(spike_k=2.0), k=3.0)
    idx = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    convert.save_checkpoint(model, model.config, str(tmp_path / "q"))
    loaded, config = load_checkpoint(str(tmp_path / "q"))
    assert config.spike_k == 3.0
    m = loaded.get_submodule("blocks.1.mlp.up_proj")
    assert isinstance(m, FP8SpikeLinear) and m.fp8_weight.dtype == torch.uint8 and m.spike_k == 3.0
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    bf, _ = load_checkpoint(str(tmp_path / "q"), dtype=torch.bfloat16)
    up = bf.get_submodule("blocks.1.mlp.up_proj")
    assert bf.embed.weight.dtype == torch.bfloat16 and up.scales.dtype == torch.float32 and up.fp8_weight.dtype == torch.uint8


def test_replace_linears_for_state_swaps_fp8_layers():
    state = {k: v for k, v in replace_linears_fp8(_tiny(), k=2.0).state_dict().items() if k.startswith("blocks.0.")}
    state.update({k: v for k, v in _tiny(seed=1).state_dict().items() if not k.startswith("blocks.0.")})
    with torch.device("meta"):
        model = replace_linears_for_state(GPT(Config.from_name("tiny")), state, k=2.0)
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, FP8SpikeLinear)}
    assert set(fp8) == {k.removesuffix(".fp8_weight") for k in state if k.endswith(".fp8_weight")}
    assert len(fp8) == 9 and all(n.startswith("blocks.0.") and m.spike_k == 2.0 for n, m in fp8.items())
    assert all(type(m) is Linear for n, m in model.named_modules() if n.startswith("blocks.1.") and "proj" in n)
    assert quantized_format(model) == "FP8"
    model.load_state_dict(state, assign=True)                          # every tensor has its place
    with torch.device("meta"), pytest.raises(ValueError, match="holds FP8 weights, .* needs a spike_k"):
        replace_linears_for_state(GPT(Config.from_name("tiny")), state, k=None)


def test_quantizers_refuse_a_quantized_model_by_name():
    for model, fmt, held in ((replace_linears(_tiny(), k=3.0), "a W8ASpike", "INT8"),
                             (replace_linears_fp8(_tiny(), k=3.0), "an FP8", "e4m3")):
        assert quantized_format(model) == fmt.split()[1]
        for quantize in (quantize_int8, partial(replace_linears_fp8, k=3.0)):
            with pytest.raises(ValueError, match=f"no float projections to quantize \\({fmt} checkpoint holds {held} "
                                                 f"weights already: quantize the float checkpoint it came from\\)"):
                quantize(model)
    assert quantized_format(_tiny()) is None


@pytest.mark.parametrize("w8", [False, True])
def test_truncated_weights_file_is_named(tmp_path, w8):
    model = replace_linears(_tiny(), k=3.0, group_size=32) if w8 else _tiny()
    convert.save_checkpoint(model, model.config, str(tmp_path / "m"))
    w_file = tmp_path / "m" / "model.safetensors"
    with open(w_file, "r+b") as f:
        f.truncate(os.path.getsize(w_file) - 100)   # the header intact, the last tensor cut short
    with pytest.raises(ValueError, match="model.safetensors cannot be read as safetensors"):
        load_checkpoint(str(tmp_path / "m"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["w8aspike", "fp8"])
def test_gpu_forward_matches_cpu(fmt):
    """The GPU's 8-bit GEMMs (int8 spike_linear; FP8 torch._scaled_mm with bf16 out) against the CPU's float
    reference: the same logits but for the GPU's rounding (and the spike flips it causes downstream)."""
    if fmt == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs CUDA capability >= 8.9 (FP8 tensor cores)")
    model = (replace_linears(_tiny(), k=3.0, group_size=32) if fmt == "w8aspike" else
             replace_linears_fp8(_tiny(spike_k=3.0), k=3.0))
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        cpu = model(idx)[0]
        gpu = model.cuda()(idx.cuda())[0].cpu()
    assert torch.nn.functional.cosine_similarity(cpu.flatten(), gpu.flatten(), dim=0) > (0.999 if fmt == "w8aspike"
                                                                                         else 0.99)


# ----------------------------------------------------------------------------- a spiking model trains and generates

def test_spiking_tiny_model_trains():
    model = _tiny(spike_k=3.0).train()
    assert all(m.spike_k == 3.0 for m in model.modules() if isinstance(m, Linear))
    idx = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        _, loss, _ = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0    # gradients pass the spikes (STE)
    assert losses[-1] < losses[0] - 0.5


def _greedy(model, prompt, n, use_cache):
    ids = prompt.clone()
    if use_cache:
        cache = model.new_cache(1, prompt.shape[1] + n)
        logits = model(ids, cache=cache, last_only=True)[0]
        for _ in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            logits = model(nxt, cache=cache)[0]
    else:
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("w8", [False, True])
def test_spiking_tiny_model_generates_with_cache(w8):
    model = _tiny(spike_k=3.0).double()                                # float64: no spike flips between paths
    if w8:
        replace_linears(model, k=3.0, group_size=32)
    prompt = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert _greedy(model, prompt, 8, True) == _greedy(model, prompt, 8, False)

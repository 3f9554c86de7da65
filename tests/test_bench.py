"""bench.py on a CPU. The 76B cut to a few real-width layers keeps its MoE layers and sinks, its FLOPs and bytes
count active parameters, and each subcommand that takes --n_layer runs a tiny MoE model beside a dense one. The
routes `bench.py spike_gemm` times compute what they claim (each against float64 on the same quantized
operands), and `bench.py ttft / decode --quant` time the model as generate.py --quant int8 and convert.py
w8aspike make it. `bench.py ttft --cp N` splits each prompt over N gloo processes and gets one process's first
token.

CPU: TRITON_INTERPRET=1 python -m pytest -q tests/test_bench.py   (the spike_linear route then runs the Triton
kernel under the interpreter; without it, its twin spike_linear_torch)
"""
import os
import re

import pytest
import torch

import bench
import kernels
import spiking
from model import GPT, Config, Linear


def meta_model(c):
    with torch.device("meta"):
        return GPT(c)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_first_layers_of_the_76b_keep_experts_full_attention_and_sinks(n):
    """The 76B's first layers alone are dense SWA layers: a cut follows its layout rules at depth n instead, so every
    cut of 2 layers or more holds MoE layers, a full-attention layer and the 128 sinks at the real widths."""
    c, full = bench.first_layers("spikingbrain-76b", n), Config.from_name("spikingbrain-76b")
    assert c.n_layer == len(c.layout) == n and c.moe_layers and any("fa" in c.mixers(i) for i in range(n))
    assert (c.n_sink, c.n_embd, c.intermediate_size, c.n_expert, c.top_k) == (128, 3584, 18944, 16, 1)
    assert len(c.moe_layers) / n >= 0.5 and len(full.moe_layers) / 28 == 0.75
    m = meta_model(c)
    expert = sum(p[0].numel() for p in m.blocks[c.moe_layers[0]].mlp.experts.parameters())   # one of the stacked
    assert m.num_params() - m.num_params(active_only=True) == len(c.moe_layers) * 15 * expert
    # the MFU's FLOPs count a token's experts only: 6 * active params plus the mixing terms
    assert 6 * m.num_params(active_only=True, embeddings=False) < m.flops_per_token(8192) < \
        6 * m.num_params(embeddings=False)
    assert bench.first_layers("spikingbrain-7b", 2).layout == ["gla", "swa"]
    assert bench.first_layers("tiny-moe", 2).moe_layers == [1]


def test_decode_bound_reads_only_the_picked_experts():
    """One row picks top_k experts per MoE layer: a batch-1 step reads the active weights (less the embedding
    table); a batch of many rows reads nearly all of them."""
    m = meta_model(bench.first_layers("spikingbrain-76b", 4))
    b = m.embed.weight.element_size()
    active = b * (m.num_params(active_only=True) - m.embed.weight.numel())
    everything = b * (m.num_params() - m.embed.weight.numel())
    assert bench.weight_bytes_read(m, 1) == pytest.approx(active)
    assert active < bench.weight_bytes_read(m, 8) < bench.weight_bytes_read(m, 256) <= everything
    assert bench.weight_bytes_read(m, 256) == pytest.approx(everything, rel=1e-3)


def test_bench_moe_tiny(capsys):
    bench.bench_moe(tiny=True, rows=5)
    out = capsys.readouterr().out
    for row in ("MoE, grouped GEMMs", "MoE, per-expert loop", "dense SwiGLU 320 (same active FLOPs)",
                "dense SwiGLU 160 (one expert's width)", "x its MFU (aim >= 0.8; median of 5 alternated runs: ",
                "## MoE forward + backward"):
        assert row in out, out
    runs = [float(r) for r in out.split("alternated runs: ")[1].split(")")[0].split(", ")]
    head = float(out.split("(same active FLOPs): ")[1].split("x")[0])
    assert len(runs) == 5 and head == sorted(runs)[2], out   # the headline is the middle of the five
    assert bench.kernels.MOE_IMPL == "auto"   # restored


def test_bench_train_moe_layers_beside_dense(capsys):
    bench.bench_train(preset="tiny-moe", baseline="tiny-qwen", n_layer=2, seq_len=64, long_seq_lens=(), steps=1,
                      warmup=1, precision="32-true", docs=2, device="cpu")
    out = capsys.readouterr().out
    assert "| tiny-moe | 2 | 64 | 2 |" in out and "| tiny-qwen | 2 | 64 | 1 |" in out, out


def test_bench_ttft_and_decode_moe_layers_beside_dense(capsys):
    models = ("tiny-moe", "tiny-qwen")
    bench.bench_ttft(models=models, lengths=(64, 128), chunk=64, budget_s=5.0, n_layer=2, device="cpu")
    bench.bench_decode(models=models, contexts=(64,), batches=(1, 2), steps=2, n_layer=2, device="cpu")
    out = capsys.readouterr().out
    assert out.count("layers 2") == 2 and "tiny-moe      128" in out and "tiny-qwen   2       64" in out, out


def spike_case(M=37, K=200, N=48, seed=0, outlier=True):
    """x [M, K], w [N, K] float32; K = 200: a group of 128 and a partial one. One channel of row 3 sits far past
    127 thresholds (a row whose counts do not fit int8)."""
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen) / K ** 0.5
    if outlier:
        x[3, 5] = 1000.0
    return x, w


def test_spike_gemm_routes_match_float64():
    x, w = spike_case()
    routes, ops = bench.spike_gemm_routes(x, w, k=3.0, group_size=128, fp8=True)
    assert set(routes) == {"bf16", "spike_linear", "W8ASpikeLinear", "fp8", "FP8SpikeLinear"}
    layer = ops["layer"]
    assert isinstance(layer, spiking.W8ASpikeLinear) and layer.spike_k == 3.0 and layer.group_size == 128
    q, s = spiking.quantize_weight(w, 128)
    assert torch.equal(layer.qweight, q) and torch.equal(layer.scales, s)   # the conversion's INT8 weights

    # the counts are x's spike quantization, clamped to int8; the wide row is flagged
    exact, vth = spiking.spike_quant(x, 3.0)
    assert torch.equal(ops["vth"], vth) and torch.equal(ops["counts"].float(), exact.clamp(-127, 127))
    assert ops["wide"].nonzero().flatten().tolist() == [3]

    def f64(counts, v):
        return kernels.spike_linear_torch(counts, v, q, s, 128, out_dtype=torch.float64)

    def close(y, want, rel):
        assert y.shape == want.shape
        err = (y.double() - want).abs().max().item()
        assert err <= rel * want.abs().max().item(), err

    close(routes["bf16"](), x.double() @ w.double().T, 1e-5)
    close(routes["spike_linear"](), f64(ops["counts"], ops["vth"]), 1e-5)   # the clamped int8 operands
    close(routes["W8ASpikeLinear"](), f64(exact, vth), 1e-5)              # the layer takes row 3 exactly
    a8, b8, b_scale = ops["fp8"]
    close(routes["fp8"](), (a8.double() * vth.double()) @ (b8.double() * b_scale.double().T).T, 2.0 ** -8)
    # the FP8 layer from x: the library's e4m3 weights, its twin on the same operands (row 3 past 448: exact counts)
    fp8_layer = ops["fp8_layer"]
    assert isinstance(fp8_layer, spiking.FP8SpikeLinear) and torch.equal(fp8_layer.fp8_weight, b8.view(torch.uint8))
    close(routes["FP8SpikeLinear"](), kernels.spike_linear_fp8_torch(x, b8, b_scale.view(-1), 3.0), 1e-5)

    # fp8 operands: counts exact up to 16, coarser past it; weights within e4m3's rounding of w
    c = ops["counts"].float()
    small = c.abs() <= 16
    assert torch.equal(a8.float()[small], c[small]) and (a8.float() != c).any()
    assert ((a8.float() - c).abs() <= c.abs() / 16).all()
    wq = b8.double() * b_scale.double().T
    assert ((wq - w.double()).abs() <= w.double().abs() / 16 + 2.0 ** -10 * b_scale.double().T).all()


def test_spike_gemm_times_every_route_of_every_7b_projection(monkeypatch, capsys):
    assert bench.block_projections("spikingbrain-7b") == {
        (3584, 3584): ["q_proj", "o_proj"], (3584, 512): ["k_proj", "v_proj"], (3584, 16): ["gk_proj.0"],
        (16, 512): ["gk_proj.1"], (3584, 18944): ["gate_proj", "up_proj"], (18944, 3584): ["down_proj"]}
    timed = []
    ms = bench.ms

    def spy(fn, device):
        y = fn()
        timed.append((tuple(y.shape), y.dtype))
        return ms(fn, device)

    monkeypatch.setattr(bench, "ms", spy)
    bench.bench_spike_gemm(tiny=True)
    shapes = bench.block_projections("tiny")
    routes = 5 if bench.fp8_missing("cpu") is None else 3
    assert len(timed) == routes * len(shapes)
    assert [s for s, _ in timed] == [(64, n) for (_, n) in shapes for _ in range(routes)]
    out = capsys.readouterr()[0]
    assert "block's 9 projections, M=64" in out


def test_spike_gemm_bad_input():
    with pytest.raises(ValueError, match="k=0"):
        bench.bench_spike_gemm(tiny=True, k=0.0)
    with pytest.raises(ValueError, match="group_size"):
        bench.bench_spike_gemm(tiny=True, group_size=0)


def tiny_model(name="tiny"):
    torch.manual_seed(0)
    return GPT(Config.from_name(name)).eval()


QUANTS = [("int8", None), ("w8aspike", bench.SPIKE_K), ("fp8", bench.SPIKE_K)]
LAYER = {"int8": spiking.W8ASpikeLinear, "w8aspike": spiking.W8ASpikeLinear, "fp8": spiking.FP8SpikeLinear}


@pytest.mark.parametrize("quant,k", QUANTS)
def test_quantize_is_the_library_conversion(quant, k):
    """bench's int8 model is generate.py --quant int8's (spiking.quantize_int8), its w8aspike model convert.py
    w8aspike's (spiking.replace_linears, max scales), its fp8 model generate.py --quant fp8's
    (spiking.replace_linears_fp8): the same buffers, the same logits; weight_bytes counts the 8-bit weights and
    scales."""
    m, ref = bench.quantize(tiny_model(), quant), tiny_model()
    if quant == "int8":
        spiking.quantize_int8(ref, group_size=128)
    elif quant == "fp8":
        spiking.replace_linears_fp8(ref, k=3.0)
    else:
        spiking.replace_linears(ref, k=3.0, group_size=128)
    assert m.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    layers = [mod for mod in m.modules() if isinstance(mod, LAYER[quant])]
    assert layers and not any(isinstance(mod, Linear) for mod in m.modules())
    assert all(mod.spike_k == k for mod in layers) and m.config.spike_k == k
    idx = torch.randint(0, m.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(m(idx)[0], ref(idx)[0])
    floats = tiny_model()
    linear = sum(mod.weight.numel() * 4 for mod in floats.modules() if isinstance(mod, Linear))
    int8 = sum(getattr(mod, "qweight", getattr(mod, "fp8_weight", None)).numel() + mod.scales.numel() * 4
               for mod in layers)
    assert bench.weight_bytes(m) == bench.weight_bytes(floats) - linear + int8 < bench.weight_bytes(floats)


def assert_quantized(models, k, layer=spiking.W8ASpikeLinear):
    assert {m.config.name for m in models} == {"tiny", "tiny-qwen"}
    for m in models:
        assert not any(isinstance(mod, Linear) for mod in m.modules())
        layers = [mod for mod in m.modules() if isinstance(mod, layer)]
        assert len(layers) >= 7 * m.config.n_layer and all(mod.spike_k == k for mod in layers)


@pytest.mark.parametrize("quant,k", QUANTS)
def test_ttft_times_the_quantized_model(monkeypatch, capsys, quant, k):
    timed, ttft = [], bench.time_to_first_token
    monkeypatch.setattr(bench, "time_to_first_token", lambda m, *a, **kw: (timed.append(m), ttft(m, *a, **kw))[1])
    bench.bench_ttft(tiny=True, quant=quant)
    assert_quantized(timed, k, LAYER[quant])
    assert f"quant {quant}" in capsys.readouterr()[0]


@pytest.mark.parametrize("quant,k", QUANTS)
def test_decode_times_the_quantized_model_and_bounds_it_by_its_bytes(monkeypatch, capsys, quant, k):
    timed, sized = [], []
    time_decode, weight_bytes = bench.time_decode, bench.weight_bytes
    monkeypatch.setattr(bench, "time_decode", lambda step, *a: (timed.append(step.__self__), time_decode(step, *a))[1])
    monkeypatch.setattr(bench, "weight_bytes", lambda m, *a, **kw: (sized.append(m), weight_bytes(m, *a, **kw))[1])
    bench.bench_decode(tiny=True, quant=quant)
    assert_quantized(timed, k, LAYER[quant])
    assert timed and all(any(m is s for s in sized) for m in timed)   # the bound's bytes: the timed model
    assert f"quant {quant}; projections at batch 1: {bench.decode_route(quant, 'cpu')};" in capsys.readouterr()[0]


def test_time_decode_warms_up_by_time_then_takes_the_median_window(monkeypatch):
    """time_decode: `warm` steps, then steps in sixteens until warm_s seconds have passed (at most WARM_MAX), then
    `windows` timed windows of `steps` each; it returns their median, each window's seconds per step, and leaves
    the cache as far on as the steps it ran (the bench sizes a full-attention cache by it)."""
    import statistics
    m = bench.random_model("tiny", "cpu", torch.float32, 2).eval()
    cache = m.new_cache(1, 4096)
    tok = torch.zeros(1, 1, dtype=torch.long)
    monkeypatch.setattr(bench, "WARM_MAX", 32)
    t, t_warm, peak, per = bench.time_decode(m.forward, cache, tok, 3, 5, False, warm_s=60.0, windows=3)
    assert cache.seen == 3 + 32 + 3 * 5                 # the warm-up stopped at WARM_MAX, not after a minute
    assert len(per) == 3 and t == statistics.median(per) and peak == 0 and t_warm >= 0
    cache = m.new_cache(1, 4096)
    bench.time_decode(m.forward, cache, tok, 3, 5, False)
    assert cache.seen == 3 + 5                          # the defaults: one window, no timed warm-up


def test_decode_route_names_the_layers_dispatch(monkeypatch):
    """bench.py decode's header names the projections' path as the layers pick it: on a CPU the float references;
    with the GEMVs forced (as on CUDA) kernels.fp8_gemv / w8aspike_gemv up to 8 rows, the GEMMs past them."""
    assert bench.decode_route("fp8", "cpu") == "FP8SpikeLinear's float reference"
    assert bench.decode_route("int8", "cpu") == "dequantized weights, F.linear"
    assert bench.decode_route("bf16", "cpu") == "F.linear"
    monkeypatch.setattr(kernels, "FP8_GEMV_IMPL", "triton")
    assert bench.decode_route("fp8", "cpu", 8).startswith("kernels.fp8_gemv")
    monkeypatch.setattr(kernels, "SPIKE_FP8_IMPL", "scaled_mm")
    assert bench.decode_route("fp8", "cpu", 9) == "kernels.spike_linear_fp8 (torch._scaled_mm)"
    assert bench.decode_route("w8aspike", "cpu") == "W8ASpikeLinear's float reference"
    monkeypatch.setattr(kernels, "INT8_GEMV_IMPL", "triton")
    monkeypatch.setattr(kernels, "SPIKE_GEMM_IMPL", "triton")
    assert bench.decode_route("w8aspike", "cpu", 8).startswith("kernels.w8aspike_gemv")
    assert bench.decode_route("w8aspike", "cpu", 9) == "kernels.spike_linear"
    assert bench.decode_route("int8", "cpu", 8) == "kernels.int8_gemv"


def test_bad_quant_fails_before_any_model():
    for fn in (bench.bench_ttft, bench.bench_decode):
        with pytest.raises(ValueError, match="choose one of bf16, int8, w8aspike"):
            fn(tiny=True, quant="fp4")


def test_ttft_split_over_two_processes_gives_one_process_first_token(capfd):
    """bench.py ttft --cp 2 on a CPU: two gloo processes prefill halves of each prompt's rounds (2 x 128 tokens:
    one round at 64 and 256 tokens, four at 1024), the last one's first greedy token is the token one process gets
    from the whole prompt; the full-attention baseline is skipped with a note."""
    rows = bench.bench_ttft(tiny=True, cp=2)
    out = capfd.readouterr().out
    assert "tiny-qwen: skipped, full attention" in out, out
    assert [(r["model"], r["T"], r["ranks"]) for r in rows] == [("tiny", T, 2) for T in (64, 256, 1024)]
    for r in rows:
        assert r["token"] == r["token_one"] >= 0 and r["split"] > 0 and r["comm"] > 0 and r["one"] > 0, r
        assert r["token_gap"] == 0 and r["top2"] >= 0, r   # the same token: no gap; top2 a difference of sorted logits
        assert (r["share"] > 0) == (r["T"] == 1024), r   # the cache shared between rounds: only at 1024
        assert r["comm"] == pytest.approx(4 * r["gathers"] + 3 * r["share"] if r["T"] == 1024 else r["gathers"]), r
        assert re.search(rf"^ +tiny +{r['T']} +2 .* yes +0\.0000 +{r['top2']:.4f}$", out, re.M), out   # its row
    assert "projection, not a measurement: tiny, 1048576 tokens, from T=1024 on 2 ranks" in out, out
    assert all(f"\n{P:>6} " in out for P in (1, 8, 32, 128)) and "the report (Table 7)" in out, out


def test_train_split_over_two_processes(capfd):
    """bench.py train --cp 2 on a CPU: a row split over two gloo processes as train.py --context_parallel trains it
    (4 packed documents, one crossing the slices' edge), then one process on rows of half the length; one table row
    each and the ratio of tokens/s per device."""
    rows = bench.bench_train(preset="tiny", seq_len=256, cp=2, device="cpu", steps=1, warmup=1, docs=3)
    out = capfd.readouterr().out
    assert [(r["seq"], r["ranks"]) for r in rows] == [(256, 2), (128, 1)], rows
    assert all(r["tok_s_per_device"] > 0 for r in rows), rows
    assert "| tiny | 4 | 256 | 2 | 3 |" in out and "| tiny | 4 | 128 | 1 | 3 |" in out, out
    ratio = rows[0]["tok_s_per_device"] / rows[1]["tok_s_per_device"]
    assert f"tiny: 256 tokens split over 2 devices / 128 on one: {ratio:.2f}x tokens/s per device" in out, out


def test_ttft_split_over_three_uneven_slices(capfd):
    """Prompt lengths that 3 ranks cannot split evenly, and a one-process chunk that does not divide them."""
    rows = bench.bench_ttft(models=("tiny",), lengths=(67, 200), chunk=32, device="cpu", cp=3)
    assert [r["T"] for r in rows] == [67, 200] and all(r["token"] == r["token_one"] >= 0 for r in rows), rows
    assert "split over 3 gloo processes" in capfd.readouterr().out


def test_ttft_split_refuses_what_it_cannot_run(capsys):
    with pytest.raises(ValueError, match="drop --compile"):
        bench.bench_ttft(tiny=True, cp=2, compile=True)
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match="--cp 64 needs 64 GPUs"):
            bench.bench_ttft(models=("tiny",), device="cuda", cp=64)
    assert bench.bench_ttft(models=("tiny-qwen", "tiny-moe"), lengths=(64,), device="cpu", cp=2) == []   # no spawn
    out = capsys.readouterr().out
    assert "tiny-qwen: skipped" in out and "tiny-moe: skipped" in out, out


def test_projection_scales_compute_down_and_gathers_up():
    row = dict(ranks=2, T=1000, chunk=1000, split=3.0, one=5.0, comm=1.0, gathers=1.0, share=0.5)   # 2 s compute
    proj = {P: (comp, comm) for P, comp, comm in bench.project_split(row, 8000, gpus=(8, 32))}   # 500 tokens a rank
    assert proj[1] == (40.0, 0.0)                              # one process, 8x the tokens
    assert proj[8] == pytest.approx((4.0, 7.0)) and proj[32] == pytest.approx((1.0, 31.0))   # one round each
    proj = {P: (comp, comm) for P, comp, comm in bench.project_split(dict(row, chunk=100), 8000, gpus=(8,))}
    assert proj[8] == pytest.approx((4.0, 10 * 7.0 + 9 * 0.5))   # 10 rounds of 800 tokens, 9 cache shares


def test_gemv_refuses_more_than_8_rows():
    """(What `python bench.py gemv --tiny true` prints: test_readme's check_gemv_routes.)"""
    with pytest.raises(ValueError, match="rows=9"):
        bench.bench_gemv(tiny=True, rows=9)

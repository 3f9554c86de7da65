"""bench.py on a CPU: the 76B cut to a few real-width layers keeps its MoE layers and sinks, its FLOPs and bytes count
active parameters, and each subcommand that takes --n_layer runs a tiny MoE model beside a dense one."""
import pytest
import torch

import bench
from model import GPT, Config


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
    expert = sum(p.numel() for p in m.blocks[c.moe_layers[0]].mlp.experts[0].parameters())
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
                "dense SwiGLU 160 (one expert's width)", "x its MFU (aim >= 0.8)", "## MoE forward + backward"):
        assert row in out, out
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

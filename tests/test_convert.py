"""convert.py on tiny checkpoints built here: Qwen2 -> ours (logits vs a float64 Qwen2 forward written below, and
transformers when installed), the 7B and 76B layouts, release <-> ours bit-exact, loading every kind (float,
W8ASpike, the release) with its tokenizer, the w8aspike command, errors, and the tokenizer."""
import dataclasses
import inspect
import json
import math
import os
import struct
import subprocess
import sys
import unicodedata
from collections import Counter

import pytest
import regex
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import convert
import spiking
import tokenizer as tok
from model import GPT, PRESETS, Config
from test_readme import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QWEN_CFG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "attention_dropout": 0.0,
    "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "max_position_embeddings": 256, "bos_token_id": 90, "eos_token_id": 91, "tie_word_embeddings": False,
    "use_sliding_window": False, "sliding_window": None, "max_window_layers": 4, "initializer_range": 0.02,
    "torch_dtype": "float32", "use_cache": True,
}


def write_sharded(path, tensors, n_shards):
    """Hugging Face layout: model-0000i-of-0000N.safetensors + model.safetensors.index.json."""
    names = list(tensors)
    weight_map = {}
    for i in range(n_shards):
        f = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in names[i::n_shards]}
        save_file(part, os.path.join(path, f), metadata={"format": "pt"})
        weight_map.update({k: f for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def qwen_shapes(c):
    C, I, V, H, KV = (c[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
                                     "num_key_value_heads"))
    hd = C // H
    s = {"model.embed_tokens.weight": (V, C)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s.update({p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                  p + "self_attn.q_proj.weight": (H * hd, C), p + "self_attn.q_proj.bias": (H * hd,),
                  p + "self_attn.k_proj.weight": (KV * hd, C), p + "self_attn.k_proj.bias": (KV * hd,),
                  p + "self_attn.v_proj.weight": (KV * hd, C), p + "self_attn.v_proj.bias": (KV * hd,),
                  p + "self_attn.o_proj.weight": (C, H * hd), p + "mlp.gate_proj.weight": (I, C),
                  p + "mlp.up_proj.weight": (I, C), p + "mlp.down_proj.weight": (C, I)})
    s["model.norm.weight"] = (C,)
    if not c["tie_word_embeddings"]:
        s["lm_head.weight"] = (V, C)
    return s


def random_tensors(shapes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if "norm" in k:   # norm weights near 1, everything else small and random
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.15 * torch.randn(shape, generator=g)
        out[k] = t.to(dtype)
    return out


def make_qwen(path, seed=0, n_shards=3, **overrides):
    c = dict(QWEN_CFG, **overrides)
    os.makedirs(path, exist_ok=True)
    tensors = random_tensors(qwen_shapes(c), seed)
    write_sharded(path, tensors, n_shards)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f)
    return c, tensors


# ----------------------------------------------------------------------------- float64 reference forwards

def rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rope_ref(x, theta):
    """x (T, h, d); Qwen's rotate-half layout."""
    T, _, d = x.shape
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def softmax_attn(q, k, v, visible):
    """q (T, H, d), k/v (T, H, d), visible (T, T) bool."""
    s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hts,shd->thd", s.masked_fill(~visible, float("-inf")).softmax(-1), v)


def qwen2_forward(sd, c, ids):
    """Qwen2ForCausalLM in float64 from Hugging Face names; ids (T,) -> logits (T, V)."""
    sd = {k: v.double() for k, v in sd.items()}
    C, H, KV, eps = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    hd, T = C // H, len(ids)
    x = sd["model.embed_tokens.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"], eps)
        q, k, v = (h @ sd[p + f"self_attn.{n}_proj.weight"].T + sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv")
        q, k, v = q.view(T, H, hd), k.view(T, KV, hd), v.view(T, KV, hd)
        q, k = rope_ref(q, c["rope_theta"]), rope_ref(k, c["rope_theta"])
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        x = x + softmax_attn(q, k, v, causal).reshape(T, C) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        x = x + (F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)) @ \
            sd[p + "mlp.down_proj.weight"].T
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return rms(x, sd["model.norm.weight"], eps) @ head.T


def release_forward(sd, c, ids):
    """The released GLAswaForCausalLM (SPEC §2) in float64 from its names: GLA layers step by step."""
    sd = {k: v.double() for k, v in sd.items()}
    C, H, KV, eps = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["norm_eps"]
    hd, T, rep = C // H, len(ids), H // KV
    x = sd["model.embeddings.weight"][ids]
    t_idx = torch.arange(T)
    window = (t_idx[None, :] <= t_idx[:, None]) & (t_idx[:, None] - t_idx[None, :] <= c["sliding_window"])
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "attn_norm.weight"], eps)
        q, k, v = (h @ sd[p + f"attn.{n}_proj.weight"].T + sd[p + f"attn.{n}_proj.bias"] for n in "qkv")
        q, k, v = q.view(T, H, hd), k.view(T, KV, hd), v.view(T, KV, hd)
        if i in c["attn_layers"]:
            q, k = rope_ref(q, c["rope_theta"]), rope_ref(k, c["rope_theta"])
            o = softmax_attn(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), window)
        else:
            gk = (h @ sd[p + "attn.gk_proj.0.weight"].T) @ sd[p + "attn.gk_proj.1.weight"].T + sd[p + "attn.gk_proj.1.bias"]
            g = (F.logsigmoid(gk) / 16).view(T, KV, hd).repeat_interleave(rep, 1)
            q, k, v = q.relu(), k.relu().repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            S, o = torch.zeros(H, hd, hd, dtype=torch.float64), []
            for t in range(T):
                S = g[t].exp()[:, :, None] * S + k[t][:, :, None] * v[t][:, None, :]
                o.append(torch.einsum("hk,hkv->hv", q[t] * hd ** -0.5, S))
            o = rms(torch.stack(o), sd[p + "attn.g_norm.weight"], eps)
        x = x + o.reshape(T, C) @ sd[p + "attn.o_proj.weight"].T
        h = rms(x, sd[p + "mlp_norm.weight"], eps)
        x = x + (F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)) @ \
            sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T


def read_dir(path):
    """All tensors of a safetensors directory (single file or shards)."""
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


# ----------------------------------------------------------------------------- Qwen2 -> ours

@pytest.mark.parametrize("tied", [False, True])
def test_qwen_to_ours_logits_match_qwen2(tmp_path, tied):
    c, src_t = make_qwen(tmp_path / "qwen", tie_word_embeddings=tied)
    convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "ours"), to="qwen2.5", dtype="float64")
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.yaml", "model.safetensors"]
    model, config = convert.load_checkpoint(str(tmp_path / "ours"))
    assert config.layout == ["fa"] * 4 and (config.bos_id, config.eos_id) == (90, 91)
    ids = torch.randint(0, c["vocab_size"], (21,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids[None])[0][0]
    ref = qwen2_forward(src_t, c, ids)
    # RoPE angles and norm statistics are float32 in model.py and in transformers, even for float64 weights
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_qwen_reference_agrees_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    c, src_t = make_qwen(tmp_path / "qwen")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "qwen"), dtype=torch.float64,
                                                       attn_implementation="eager").eval()
    ids = torch.randint(0, c["vocab_size"], (21,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids[None]).logits[0], qwen2_forward(src_t, c, ids), rtol=1e-5, atol=1e-5)


def write_config(path, c):
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f)


def v5_layout(c):
    """A config.json as transformers 5 writes it: rope_parameters instead of rope_theta, layer_types, dtype."""
    c = {k: v for k, v in c.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    return dict(c, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, dtype="float32",
                layer_types=["full_attention"] * c["num_hidden_layers"])


@pytest.mark.parametrize("layout", ["rope_theta", "rope_parameters"])
def test_qwen_rope_theta_read_in_either_config_layout(tmp_path, layout):
    c, src_t = make_qwen(tmp_path / "qwen", rope_theta=1e6)
    if layout == "rope_parameters":
        write_config(tmp_path / "qwen", v5_layout(c))
    convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "ours"), to="qwen2.5", dtype="float64")
    model, config = convert.load_checkpoint(str(tmp_path / "ours"))
    assert config.rope_theta == 1e6
    ids = torch.randint(0, c["vocab_size"], (21,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids[None])[0][0]
    torch.testing.assert_close(ours, qwen2_forward(src_t, c, ids), rtol=1e-5, atol=1e-5)
    # the theta reaches the logits: converted with Qwen2's default 10000, the match above would fail
    assert (ours - qwen2_forward(src_t, dict(c, rope_theta=10000.0), ids)).abs().max() > 1e-3


@pytest.mark.parametrize("change, match", [
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
     "rope_scaling rope_type 'yarn'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling rope_type 'dynamic'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}),
     "rope_parameters rope_type 'linear'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_parameters rope_type 'llama3'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]}),
     r"rope_parameters sets \['mrope_section'\]"),
    (dict(rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
     "RoPE theta given twice"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=2), r"sliding-window attention in layers \[2, 3\]"),
    (dict(layer_types=["full_attention", "sliding_attention", "full_attention", "full_attention"]),
     r"sliding-window attention in layers \[1\]"),
    (dict(layer_types=["full_attention"] * 3), "layer_types has 3 entries for 4 layers"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_qwen_config_settings_that_change_the_math_are_refused(tmp_path, change, match):
    make_qwen(tmp_path / "qwen", **change)
    with pytest.raises(ValueError, match=match):
        convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "out"), to="qwen2.5")
    assert not os.path.exists(tmp_path / "out")


def test_qwen_inert_settings_are_accepted(tmp_path):
    # use_sliding_window with max_window_layers >= the depth slides no layer; rope_type default is plain RoPE
    make_qwen(tmp_path / "qwen", use_sliding_window=True, sliding_window=8, max_window_layers=4, rope_theta=None,
              rope_scaling={"type": "default", "rope_theta": 5e5})
    convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "out"), to="qwen2.5")
    assert convert.load_config(tmp_path / "out" / "config.yaml").rope_theta == 5e5


def test_qwen_tied_config_with_a_different_stored_head_is_an_error(tmp_path):
    c, t = make_qwen(tmp_path / "qwen", n_shards=1)   # lm_head.weight stored, random: not the embedding
    write_config(tmp_path / "qwen", dict(c, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="tie_word_embeddings true but lm_head.weight differs"):
        convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "out"), to="qwen2.5")
    assert not os.path.exists(tmp_path / "out")
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()   # stored and equal: what transformers ties
    os.remove(tmp_path / "qwen" / "model-00001-of-00001.safetensors")
    write_sharded(tmp_path / "qwen", t, 1)
    convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "out"), to="qwen2.5")
    got = read_dir(tmp_path / "out")
    assert torch.equal(got["lm_head.weight"], t["model.embed_tokens.weight"])


@pytest.mark.parametrize("tied", [False, True])
def test_qwen_saved_by_transformers_converts_to_its_logits(tmp_path, tied):
    """The oracle: a Qwen2 written by transformers' own save_pretrained (its config.json layout, whatever the
    installed version writes) converts to a model with transformers' logits."""
    transformers = pytest.importorskip("transformers")
    c = dict(QWEN_CFG, rope_theta=1e6, tie_word_embeddings=tied)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings")
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{k: c[k] for k in keys}))
    src_t = random_tensors(qwen_shapes(c), seed=4)
    hf.load_state_dict(src_t, strict=not tied)   # tied: lm_head is the embedding
    hf.save_pretrained(str(tmp_path / "qwen"))
    convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "ours"), to="qwen2.5", dtype="float64")
    model, config = convert.load_checkpoint(str(tmp_path / "ours"))
    assert config.rope_theta == 1e6
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "qwen"), dtype=torch.float64,
                                                       attn_implementation="eager").eval()
    ids = torch.randint(0, c["vocab_size"], (21,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids[None])[0][0], hf(ids[None]).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours - qwen2_forward(src_t, dict(c, rope_theta=10000.0), ids)).abs().max() > 1e-3


def test_load_checkpoint_reads_shards(tmp_path):
    config = Config.from_name("tiny")
    state = GPT(config).state_dict()
    os.makedirs(tmp_path / "ours")
    write_sharded(tmp_path / "ours", state, 3)
    convert.save_config(config, tmp_path / "ours" / "config.yaml")
    model, _ = convert.load_checkpoint(str(tmp_path / "ours"))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_qwen_to_7b_layout(tmp_path):
    c, src = make_qwen(tmp_path / "qwen")
    convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "sb"), to="spikingbrain-7b")
    config = convert.load_config(tmp_path / "sb" / "config.yaml")
    assert config.layout == ["gla", "swa", "gla", "swa"] and not config.moe_layers and config.name == "custom"
    got = read_dir(tmp_path / "sb")
    assert set(got) == set(GPT(config).state_dict())
    assert torch.equal(got["embed.weight"], src["model.embed_tokens.weight"])
    assert torch.equal(got["norm.weight"], src["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], src["lm_head.weight"])
    for i in range(4):
        q, o = f"model.layers.{i}.", f"blocks.{i}."
        pairs = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight",
                 "self_attn.o_proj.weight": "attn.o_proj.weight", "mlp.gate_proj.weight": "mlp.gate_proj.weight",
                 "mlp.up_proj.weight": "mlp.up_proj.weight", "mlp.down_proj.weight": "mlp.down_proj.weight"}
        pairs.update({f"self_attn.{n}_proj.{w}": f"attn.{n}_proj.{w}" for n in "qkv" for w in ("weight", "bias")})
        for a, b in pairs.items():
            assert torch.equal(got[o + b], src[q + a]), (q + a, o + b)
            assert got[o + b].dtype == torch.float32
        if i % 2 == 0:   # GLA: the new pieces
            w0, w1, b1 = (got[o + f"attn.gk_proj.{n}"] for n in ("0.weight", "1.weight", "1.bias"))
            assert w0.shape == (16, 32) and w1.shape == (16, 16) and torch.equal(b1, torch.zeros(16))
            for w in (w0, w1):   # xavier-uniform with gain 2^-2.5: small, inside the bound, not zero
                bound = 2 ** -2.5 * math.sqrt(6 / sum(w.shape))
                assert 0 < w.abs().max() <= bound
            assert torch.equal(got[o + "attn.g_norm.weight"], torch.ones(8))
        else:
            assert not any(k.startswith(o + "attn.g") for k in got)
    # the converted model runs, and the same seed gives the same new weights
    model, _ = convert.load_checkpoint(str(tmp_path / "sb"))
    assert torch.isfinite(model(torch.arange(10)[None])[0]).all()
    convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "sb2"), to="spikingbrain-7b")
    assert all(torch.equal(v, read_dir(tmp_path / "sb2")[k]) for k, v in got.items())


def test_76b_layout_rule_reproduces_the_preset():
    assert convert.layout_76b(28) == PRESETS["spikingbrain-76b"]["layout"]
    assert convert.moe_layers_76b(28) == PRESETS["spikingbrain-76b"]["moe_layers"]
    assert convert.layout_76b(4) == ["la+swa"] * 3 + ["la+fa"]
    assert convert.moe_layers_76b(4) == [1, 2, 3]
    assert convert.layout_76b(80).count("la+fa") == 11
    c = Config.from_name("spikingbrain-76b")
    assert round(convert.upcycle_alpha(c), 2) == 0.98


def check_upcycled(mlp, g, u, d, config, x):
    """An MoE layer upcycled from the dense FFN (gate g, up u, down d), at init, in float64: every expert is the FFN
    with up * alpha and down * alpha^2, and MoE(x) = FFN(x) * (S + w(x)) / (S + k/N) exactly."""
    S, k, N = config.n_shared_expert, config.top_k, config.n_expert
    alpha = (1 / (S + k / N)) ** (1 / 3)
    routed = [{k: mlp.experts[k].weight[e] for k in ("gate_proj", "up_proj", "down_proj")} for e in range(N)]
    shared = [{k: getattr(m, k).weight for k in ("gate_proj", "up_proj", "down_proj")} for m in mlp.shared]
    for m in routed + shared:   # every expert: gate as is, up * alpha, down * alpha^2
        torch.testing.assert_close(m["gate_proj"], g, rtol=0, atol=0)
        torch.testing.assert_close(m["up_proj"], u * alpha, rtol=1e-15, atol=0)
        torch.testing.assert_close(m["down_proj"], d * alpha ** 2, rtol=1e-15, atol=0)
    with torch.no_grad():
        out, _, _ = mlp(x)
        # the top-k router weight (float64 here, as the model keeps its router probabilities in x's dtype or float32)
        w = F.softmax(mlp.router(x), -1).topk(k, -1).values.sum(-1, keepdim=True)
    torch.testing.assert_close(out, (F.silu(x @ g.T) * (x @ u.T)) @ d.T * (S + w) / (S + k / N), rtol=1e-12,
                               atol=1e-14)


def test_qwen_to_76b_upcycling_exact(tmp_path):
    c, src = make_qwen(tmp_path / "qwen")
    convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "moe"), to="spikingbrain-76b",
                         dtype="float64", n_expert=4, n_sink=3)
    model, config = convert.load_checkpoint(str(tmp_path / "moe"))
    assert config.layout == ["la+swa", "la+swa", "la+swa", "la+fa"] and config.moe_layers == [1, 2, 3]
    assert (config.n_expert, config.n_sink, config.n_shared_expert, config.top_k) == (4, 3, 1, 1)
    x = torch.randn(50, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for i in range(4):
        p = f"model.layers.{i}.mlp."
        g, u, d = (src[p + f"{n}_proj.weight"].double() for n in ("gate", "up", "down"))
        if i in config.moe_layers:
            check_upcycled(model.blocks[i].mlp, g, u, d, config, x)
        else:
            torch.testing.assert_close(model.blocks[i].mlp(x), (F.silu(x @ g.T) * (x @ u.T)) @ d.T, rtol=0, atol=0)
    sd = model.state_dict()
    assert sd["sinks"].shape == (3, 32) and 0 < sd["sinks"].std() < 0.05
    for i in range(4):
        assert torch.equal(sd[f"blocks.{i}.attn.g_norm.weight"], torch.ones(8))
        assert torch.equal(sd[f"blocks.{i}.attn.a_norm.weight"], torch.ones(8))
        assert torch.equal(sd[f"blocks.{i}.attn.q_proj.weight"], src[f"model.layers.{i}.self_attn.q_proj.weight"].double())
    assert torch.isfinite(model(torch.arange(12)[None])[0]).all()


# ----------------------------------------------------------------------------- our dense checkpoint -> ours

def dense_checkpoint(path, seed=0):
    """A tiny dense model of ours (the qwen2.5 layout), random float64 weights everywhere (norms near 1, biases
    nonzero), saved with the byte tokenizer; -> its tensors."""
    config = Config.from_name("tiny-qwen", vocab_size=260, n_embd=32, n_head=4, n_kv_head=2, head_dim=8,
                              intermediate_size=48)
    state = random_tensors({k: v.shape for k, v in GPT(config).state_dict().items()}, seed, torch.float64)
    convert.save_checkpoint(state, config, str(path), byte_tokenizer(path.parent / "bytes"))
    return state


@pytest.mark.parametrize("to", ["spikingbrain-7b", "spikingbrain-76b"])
def test_dense_to_both_layouts(tmp_path, to):
    src = dense_checkpoint(tmp_path / "dense")
    kw = dict(n_expert=4, n_sink=3) if to == "spikingbrain-76b" else {}
    convert.convert_dense(src=str(tmp_path / "dense"), out=str(tmp_path / "sb"), to=to, **kw)
    assert sorted(os.listdir(tmp_path / "sb")) == ["config.yaml", "model.safetensors", "tokenizer.json",
                                                   "tokenizer.tiktoken"]
    model, c = convert.load_checkpoint(str(tmp_path / "sb"))
    assert (c.vocab_size, c.n_layer, c.n_embd, c.intermediate_size, c.name) == (260, 4, 32, 48, "custom")
    if to == "spikingbrain-7b":
        assert c.layout == ["gla", "swa", "gla", "swa"] and not c.moe_layers and not c.n_sink
    else:   # the 76B's rules at 4 layers
        assert c.layout == ["la+swa"] * 3 + ["la+fa"] and c.moe_layers == [1, 2, 3] and (c.n_expert, c.n_sink) == (4, 3)
    got = model.state_dict()
    moe = {k for k in src if ".mlp." in k and convert.template(k)[1] in c.moe_layers}
    for k in set(src) - moe:   # every other tensor as it was, bit for bit; q/k/v/o serve every branch
        assert same_bits(got[k], src[k]), k
    x = torch.randn(50, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for i in c.moe_layers:
        check_upcycled(model.blocks[i].mlp, *(src[f"blocks.{i}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")),
                       c, x)
    # it trains: one step, every parameter (the new ones too) gets a finite gradient and moves
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 260, (2, 25), generator=torch.Generator().manual_seed(3))
    _, loss, aux = model(ids[:, :-1], ids[:, 1:])
    (loss + c.aux_loss_coef * aux).backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert not torch.equal(before["blocks.0.attn.q_proj.weight"], model.blocks[0].attn.q_proj.weight)
    new = "blocks.0.attn.gk_proj.0.weight" if to == "spikingbrain-7b" else "sinks"
    assert not torch.equal(before[new], model.state_dict()[new])


@pytest.mark.parametrize("to", ["spikingbrain-7b", "spikingbrain-76b"])
def test_dense_converts_as_qwen2_does(tmp_path, to):
    """One path for both sources: a Qwen2 directory converted to the target, and the same weights converted first to
    our dense format and then with convert_dense, give the same checkpoint bit for bit."""
    make_qwen(tmp_path / "qwen")
    convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "dense"), to="qwen2.5")
    kw = dict(n_expert=4, n_sink=3) if to == "spikingbrain-76b" else {}
    convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "a"), to=to, seed=7, **kw)
    convert.convert_dense(src=str(tmp_path / "dense"), out=str(tmp_path / "b"), to=to, seed=7, **kw)
    a, b = read_dir(tmp_path / "a"), read_dir(tmp_path / "b")
    assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    assert convert.load_config(tmp_path / "a" / "config.yaml") == convert.load_config(tmp_path / "b" / "config.yaml")


def test_dense_refuses_what_is_not_dense(tmp_path):
    for name, preset in (("sb", "tiny"), ("moe", "tiny-moe")):
        config = Config.from_name(preset)
        convert.save_checkpoint(GPT(config), config, str(tmp_path / name))
    w8 = spiking.replace_linears(GPT(Config.from_name("tiny-qwen")), k=3.0, group_size=32)
    convert.save_checkpoint(w8, w8.config, str(tmp_path / "w8"))
    make_qwen(tmp_path / "qwen")
    for name, err, msg in [
            ("sb", ValueError, r"sb is not a dense checkpoint: layout \['gla', 'swa', 'gla', 'swa'\]"),
            ("moe", ValueError, r"not a dense checkpoint: layout .*; MoE layers \[1, 3\]; 4 sink tokens\. "
                                r"`convert.py dense` reads our qwen2.5 layout"),
            ("w8", ValueError, r"not a dense checkpoint: W8ASpike weights \(INT8\): convert the float checkpoint"),
            ("qwen", FileNotFoundError, r"config.yaml is missing: .* converts with `convert.py qwen2.5`")]:
        with pytest.raises(err, match=msg):
            convert.convert_dense(src=str(tmp_path / name), out=str(tmp_path / "out"), to="spikingbrain-76b")
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


# ----------------------------------------------------------------------------- released SpikingBrain-7B <-> ours

def release_config(**overrides):
    """config.json fields as in the published SpikingBrain-7B, at tiny dims."""
    return dict({
        "architectures": ["GLAswaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_gla_swa.GLAswaConfig",
                     "AutoModelForCausalLM": "modeling_gla_swa.GLAswaForCausalLM"},
        "attention_dropout": 0.0, "attn_layers": [1, 3], "attn_mode": "chunk", "bos_token_id": 90, "conv_size": 4,
        "elementwise_affine": True, "eos_token_id": 90, "fuse_cross_entropy": True, "hidden_act": "swish",
        "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48, "max_position_embeddings": 1024,
        "model_type": "gla_swa", "norm_eps": 1e-06, "num_attention_heads": 4, "num_hidden_layers": 4,
        "num_key_value_heads": 2, "rope_theta": 1000000.0, "sliding_window": 5, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.45.0", "use_cache": True, "use_short_conv": False,
        "vocab_size": 96}, **overrides)


def release_shapes(c):
    C, I, V, H, KV = 32, 48, 96, 4, 2
    hd = C // H
    s = {"model.embeddings.weight": (V, C), "model.norm.weight": (C,), "lm_head.weight": (V, C)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s.update({p + "attn_norm.weight": (C,), p + "mlp_norm.weight": (C,),
                  p + "attn.q_proj.weight": (C, C), p + "attn.q_proj.bias": (C,),
                  p + "attn.k_proj.weight": (KV * hd, C), p + "attn.k_proj.bias": (KV * hd,),
                  p + "attn.v_proj.weight": (KV * hd, C), p + "attn.v_proj.bias": (KV * hd,),
                  p + "attn.o_proj.weight": (C, C), p + "mlp.gate_proj.weight": (I, C),
                  p + "mlp.up_proj.weight": (I, C), p + "mlp.down_proj.weight": (C, I)})
        if i not in c["attn_layers"]:
            s.update({p + "attn.gk_proj.0.weight": (16, C), p + "attn.gk_proj.1.weight": (KV * hd, 16),
                      p + "attn.gk_proj.1.bias": (KV * hd,), p + "attn.g_norm.weight": (hd,)})
    return s


def make_release(path, dtype=torch.bfloat16, **overrides):
    c = release_config(**overrides)
    os.makedirs(path, exist_ok=True)
    tensors = random_tensors(release_shapes(c), seed=5, dtype=dtype)
    write_sharded(path, tensors, 2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    return c, tensors


def test_release_to_ours_to_release_bit_exact(tmp_path):
    c, src = make_release(tmp_path / "rel")
    convert.convert_release(src=str(tmp_path / "rel"), out=str(tmp_path / "ours"), to="ours")
    config = convert.load_config(tmp_path / "ours" / "config.yaml")
    assert config.layout == ["gla", "swa", "gla", "swa"] and config.window == 5 and config.max_seq_len == 1024
    convert.convert_release(src=str(tmp_path / "ours"), out=str(tmp_path / "back"), to="release", max_shard_gb=30e-6)
    back = read_dir(tmp_path / "back")
    assert set(back) == set(src)
    assert all(same_bits(back[k], src[k]) for k in src)
    with open(tmp_path / "back" / "config.json") as f:
        assert json.load(f) == c
    with open(tmp_path / "back" / "model.safetensors.index.json") as f:
        assert set(json.load(f)["weight_map"]) == set(src)


def test_ours_to_release_to_ours_bit_exact(tmp_path):
    config = Config.from_name("tiny", vocab_size=96, n_embd=32, n_head=4, n_kv_head=2, head_dim=8)
    torch.manual_seed(0)
    state = {k: (v + 0.01 * torch.randn_like(v)).to(torch.bfloat16) for k, v in GPT(config).state_dict().items()}
    convert.save_checkpoint(state, config, str(tmp_path / "ours"))
    convert.convert_release(src=str(tmp_path / "ours"), out=str(tmp_path / "rel"), to="release")
    with open(tmp_path / "rel" / "config.json") as f:
        rc = json.load(f)
    assert rc["attn_layers"] == [1, 3] and rc["torch_dtype"] == "bfloat16" and rc["sliding_window"] == 16
    assert set(rc) == set(release_config())   # the published file's fields, no more, no fewer
    convert.convert_release(src=str(tmp_path / "rel"), out=str(tmp_path / "back"), to="ours")
    back = read_dir(tmp_path / "back")
    assert set(back) == set(state) and all(same_bits(back[k], state[k]) for k in state)
    again = convert.load_config(tmp_path / "back" / "config.yaml")
    assert dict(again.to_dict(), name="tiny") == config.to_dict()


@pytest.mark.parametrize("layout", ["rope_theta", "rope_parameters"])
def test_release_logits_match_the_release_architecture(tmp_path, layout):
    c, src = make_release(tmp_path / "rel", dtype=torch.float64, rope_theta=3e3)
    if layout == "rope_parameters":   # as transformers 5 would write it; the reader's default (1e6) must not win
        write_config(tmp_path / "rel", dict({k: v for k, v in c.items() if k != "rope_theta"},
                                            rope_parameters={"rope_type": "default", "rope_theta": 3e3}))
    convert.convert_release(src=str(tmp_path / "rel"), out=str(tmp_path / "ours"), to="ours")
    model, _ = convert.load_checkpoint(str(tmp_path / "ours"))
    direct, _ = convert.load_release(str(tmp_path / "rel"))   # the same, renamed in memory
    ids = torch.randint(0, 96, (19,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = release_forward(src, c, ids)
        torch.testing.assert_close(model(ids[None])[0][0], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(direct(ids[None])[0][0], ref, rtol=1e-5, atol=1e-5)
        assert (ref - release_forward(src, dict(c, rope_theta=1e6), ids)).abs().max() > 1e-3   # theta matters


@pytest.mark.parametrize("change, match", [
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling rope_type 'linear'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}), "RoPE theta given twice"),
    (dict(attn_layers=[1, 4]), r"attn_layers \[1, 4\]: \[4\] are not layer indices 0..3"),
    (dict(sliding_window=None), "sliding_window None"),
    (dict(head_dim=16), "head_dim 16"),
    (dict(gate_low_rank_dim=32), "gate_low_rank_dim 32"),
    (dict(gate_logit_normalizer=8), "gate_logit_normalizer 8"),
    (dict(enable_spike=True), "enable_spike true"),
    (dict(elementwise_affine=False), "elementwise_affine false"),
])
def test_release_config_settings_that_change_the_math_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        convert.release_to_config(release_config(**change), "rel")


def test_release_tied_head(tmp_path):
    c, t = make_release(tmp_path / "rel")
    write_config(tmp_path / "rel", dict(c, tie_word_embeddings=True))   # lm_head stored and different
    with pytest.raises(ValueError, match="tie_word_embeddings true but lm_head.weight differs"):
        convert.convert_release(src=str(tmp_path / "rel"), out=str(tmp_path / "ours"), to="ours")
    del t["lm_head.weight"]   # not stored: made from the embedding
    for f in os.listdir(tmp_path / "rel"):
        if f != "config.json":
            os.remove(tmp_path / "rel" / f)
    write_sharded(tmp_path / "rel", t, 2)
    convert.convert_release(src=str(tmp_path / "rel"), out=str(tmp_path / "ours"), to="ours")
    got = read_dir(tmp_path / "ours")
    assert torch.equal(got["lm_head.weight"], t["model.embeddings.weight"])


@pytest.mark.parametrize("quant", [None, "w8aspike", "fp8"])
def test_checkpoints_with_one_tensor_per_expert_still_load(tmp_path, quant):
    """A tiny-moe checkpoint (float, W8ASpike or FP8) rewritten in the layout before the routed experts were
    stacked (`mlp.experts.{e}.gate_proj.weight` / `.qweight`, `.scales`, `._extra_state` per expert) loads into the
    stacked model with the same tensors and the same logits."""
    torch.manual_seed(0)
    config = Config.from_name("tiny-moe", spike_k=3.0)
    m = GPT(config).eval()
    if quant == "w8aspike":
        spiking.replace_linears(m, k=3.0, group_size=32)
    elif quant == "fp8":
        spiking.replace_linears_fp8(m, k=3.0)
    convert.save_checkpoint(m, config, str(tmp_path / "new"))
    state, old = read_dir(tmp_path / "new"), {}
    for k, v in state.items():
        head, sep, tail = k.partition(".mlp.experts.")
        if sep:   # blocks.1.mlp.experts.gate_proj.weight [E, ...] -> blocks.1.mlp.experts.{e}.gate_proj.weight
            for e in range(config.n_expert):
                old[f"{head}.mlp.experts.{e}.{tail}"] = (v if tail.endswith("_extra_state") else v[e]).clone()
        else:
            old[k] = v
    assert any(".experts.3." in k for k in old) and len(old) > len(state)
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / "model.safetensors"))
    convert.save_config(config, str(tmp_path / "old" / "config.yaml"))
    a, _ = convert.load_checkpoint(str(tmp_path / "new"))
    b, _ = convert.load_checkpoint(str(tmp_path / "old"))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    idx = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x, y = a(idx)[0], b(idx)[0]
    assert (x - y).abs().max() < 1e-5, (x - y).abs().max()   # equal weights; a matmul's last bits follow the alignment


def test_release_export_refuses_what_it_cannot_say(tmp_path):
    config = Config.from_name("tiny-moe")
    convert.save_checkpoint(GPT(config), config, str(tmp_path / "moe"))
    with pytest.raises(ValueError) as e:
        convert.convert_release(src=str(tmp_path / "moe"), out=str(tmp_path / "rel"), to="release")
    for part in ("layout[0]='la+swa'", "moe_layers", "n_sink"):
        assert part in str(e.value)
    assert not os.path.exists(tmp_path / "rel")


# ----------------------------------------------------------------------------- errors, atomicity, CLI

def leftovers(parent):
    return [f for f in os.listdir(parent) if ".tmp-" in f]


def test_bad_tensors_one_error_listing_all(tmp_path):
    c, t = make_qwen(tmp_path / "qwen")
    del t["model.layers.2.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    t["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    for f in os.listdir(tmp_path / "qwen"):
        if f.endswith(".safetensors") or f.endswith(".json") and f != "config.json":
            os.remove(tmp_path / "qwen" / f)
    write_sharded(tmp_path / "qwen", t, 2)
    with pytest.raises(ValueError) as e:
        convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "out"))
    msg = str(e.value)
    assert "3 problems" in msg
    assert "missing model.layers.2.mlp.up_proj.weight (48, 32)" in msg
    assert "unexpected model.layers.0.self_attn.extra.weight" in msg
    assert "model.layers.1.self_attn.k_proj.weight: file (8, 32), expected (16, 32)" in msg
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_not_qwen2_clear_error(tmp_path):
    make_qwen(tmp_path / "llama", model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match=r"'llama' checkpoint .*not Qwen2"):
        convert.convert_qwen(src=str(tmp_path / "llama"), out=str(tmp_path / "out"))
    make_release(tmp_path / "rel")
    with pytest.raises(ValueError, match="convert.py release"):
        convert.convert_qwen(src=str(tmp_path / "rel"), out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="not the SpikingBrain-7B release"):
        convert.convert_release(src=str(tmp_path / "llama"), out=str(tmp_path / "out"), to="ours")
    assert not os.path.exists(tmp_path / "out")


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    make_qwen(tmp_path / "qwen")
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "keep.txt").write_text("old")
    calls = []

    def failing_add(self, name, t):
        calls.append(name)
        if len(calls) == 20:
            raise OSError("disk full")
        return real_add(self, name, t)
    real_add = convert.FileWriter.add
    monkeypatch.setattr(convert.FileWriter, "add", failing_add)
    with pytest.raises(FileExistsError):   # an existing directory is not replaced without overwrite
        convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "out"))
    with pytest.raises(OSError, match="disk full"):
        convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "out"), overwrite=True)
    assert os.listdir(tmp_path / "out") == ["keep.txt"] and not leftovers(tmp_path)


def test_explicit_tokenizer_without_files_is_an_error(tmp_path):
    make_release(tmp_path / "rel")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="holds no Hugging Face"):
        convert.convert_release(src=str(tmp_path / "rel"), out=str(tmp_path / "ours"), to="ours",
                                tokenizer=str(tmp_path / "empty"))
    assert not os.path.exists(tmp_path / "ours") and not leftovers(tmp_path)
    convert.convert_release(src=str(tmp_path / "rel"), out=str(tmp_path / "ours"), to="ours")   # none asked, none
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.yaml", "model.safetensors"]
    with pytest.raises(FileNotFoundError, match="holds no Hugging Face"):
        convert.convert_release(src=str(tmp_path / "ours"), out=str(tmp_path / "back"), to="release",
                                tokenizer=str(tmp_path / "empty"))
    assert not os.path.exists(tmp_path / "back") and not leftovers(tmp_path)


def test_cli(tmp_path):
    make_qwen(tmp_path / "qwen")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "qwen2.5", "--src", str(tmp_path / "qwen"),
                        "--to", "spikingbrain-7b", "--out", str(tmp_path / "sb"), "--dtype", "bfloat16"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert all(v.dtype == torch.bfloat16 for v in read_dir(tmp_path / "sb").values())
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "release", "--src", str(tmp_path / "sb"),
                        "--to", "release", "--out", str(tmp_path / "sb")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "would replace the source" in r.stderr


def test_cli_help_says_the_readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read().split("## Converting checkpoints")[1].split("\n## ")[0]
    commands = [line.split("#")[0].split() for line in readme.splitlines() if line.startswith("python convert.py ")]
    assert {c[2] for c in commands} == {"qwen2.5", "dense", "release", "tokenizer", "w8aspike", "fp8"}

    def help_of(*args):   # the command line's help, in this process (run_main: the imports paid once)
        code, out = run_main([sys.executable, os.path.join(ROOT, "convert.py"), *args, "--help"])
        assert code == 0, out
        return out
    assert "{qwen2.5,dense,release,tokenizer,w8aspike,fp8}" in help_of()
    helps = {sub: help_of(sub) for sub in {c[2] for c in commands}}
    assert "convert.py [options] qwen2.5 " in helps["qwen2.5"]
    for c in commands:   # every option the README gives, and every --to value, is in its subcommand's help
        for i, a in enumerate(c[3:], 3):
            assert not a.startswith("--") or a in helps[c[2]], (c, a)
            assert c[i - 1] != "--to" or a in helps[c[2]], (c, a)


def test_checkpoint_config_missing_a_field_is_an_error(tmp_path):
    import yaml

    config = Config.from_name("tiny", window=7)
    convert.save_checkpoint(GPT(config), config, str(tmp_path / "ck"))
    with open(tmp_path / "ck" / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert list(saved) == [f.name for f in dataclasses.fields(Config)]   # save_config writes every field
    assert convert.load_checkpoint(str(tmp_path / "ck"))[1] == config
    del saved["window"]   # a preset's window (16) would otherwise fill in silently
    with open(tmp_path / "ck" / "config.yaml", "w") as f:
        yaml.safe_dump(saved, f)
    with pytest.raises(ValueError, match=r"lacks config field\(s\) \['window'\]: .* add them"):
        convert.load_checkpoint(str(tmp_path / "ck"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_on_a_missing_device_names_the_device_not_the_file(tmp_path, monkeypatch):
    config = Config.from_name("tiny")
    convert.save_checkpoint(GPT(config), config, str(tmp_path / "ck"))
    w8 = spiking.replace_linears(GPT(config), k=3.0, group_size=32)
    convert.save_checkpoint(w8, w8.config, str(tmp_path / "w8"))
    make_release(tmp_path / "rel")
    monkeypatch.setattr(convert, "load_file", lambda *a, **k: pytest.fail("weights read for an unusable device"))
    for path in ("ck", "w8", "rel"):
        for device in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match=r"CUDA is not available here .*use --device cpu") as e:
                convert.load_checkpoint(str(tmp_path / path), device=device)
            assert "corrupt" not in str(e.value)
    with pytest.raises(ValueError, match="'gpu' is not a device name"):
        convert.load_checkpoint(str(tmp_path / "ck"), device="gpu")


# ----------------------------------------------------------------------------- loading every kind; float -> W8ASpike

def byte_tokenizer(path):
    """Our tokenizer files for bytes only (256 ranks + <|endoftext|>): text <-> ids is exact."""
    tok.save(str(path), {bytes([i]): i for i in range(256)}, {"<|endoftext|>": 256})
    return str(path)


def ours(tmp_path, name="ck", **kw):
    """A tiny float checkpoint of ours with the byte tokenizer; -> its path."""
    torch.manual_seed(0)
    config = Config.from_name("tiny", **kw)
    convert.save_checkpoint(GPT(config), config, str(tmp_path / name), byte_tokenizer(tmp_path / "bytes"))
    return str(tmp_path / name)


def test_load_reads_every_kind_with_its_tokenizer(tmp_path):
    ck = ours(tmp_path)
    model, t = convert.load(ck)
    assert not model.training and t.n_vocab == 257 and t.decode(t.encode("spikes")) == "spikes"
    w8 = spiking.replace_linears(convert.load_checkpoint(ck)[0], k=3.0, group_size=32)
    convert.save_checkpoint(w8, w8.config, str(tmp_path / "w8"), str(tmp_path / "bytes"))
    q, _ = convert.load(str(tmp_path / "w8"), dtype="bfloat16")        # a dtype by name; INT8 layers keep theirs
    up = q.get_submodule("blocks.1.mlp.up_proj")
    assert isinstance(up, spiking.W8ASpikeLinear) and up.qweight.dtype == torch.int8
    assert up.scales.dtype == torch.float32 and q.embed.weight.dtype == torch.bfloat16
    assert q.config.spike_k == 3.0 and up.spike_k == 3.0
    rel = str(tmp_path / "rel")                                         # the release's layout: config.json
    convert.convert_release(src=ck, out=rel, to="release")
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*pass --tokenizer DIR"):
        convert.load(rel)
    release, _ = convert.load(rel, tokenizer_dir=str(tmp_path / "bytes"))
    a, b = model.state_dict(), release.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    vocab, merges = train_bpe(corpus()[:3000], 20)                     # Hugging Face files: converted on the fly
    write_hf_tokenizer(rel, vocab, merges)
    _, t = convert.load(rel)
    assert t.encode(TEXTS[0]) == reference_encode(TEXTS[0], vocab, merges, {})


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope is not a checkpoint directory: give one"):
        convert.load(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    for load in (convert.load, convert.load_checkpoint):
        with pytest.raises(FileNotFoundError, match="holds neither config.yaml .* nor config.json"):
            load(str(tmp_path / "empty"))
    small = ours(tmp_path, "small", vocab_size=200)                    # 257 byte tokens do not fit 200 ids
    with pytest.raises(ValueError, match="257 tokens but the model of .* only 200"):
        convert.load(small)
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        convert.load(small, tokenizer_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="dtype 'half'"):
        convert.load_checkpoint(small, dtype="half")
    os.remove(os.path.join(small, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="need config.yaml and model.safetensors"):
        convert.load_checkpoint(small)


def test_w8aspike_command(tmp_path, capsys):
    ck = ours(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    convert.convert_w8aspike(ckpt=ck, out=str(tmp_path / "q"), text=str(text), group_size=32, n_samples=4, seq_len=32)
    assert "32 W8ASpike layers, k=3.0, group_size=32, calibrated on 4 rows of 33 tokens" in capsys.readouterr().out
    q, t = convert.load(str(tmp_path / "q"))                           # with the tokenizer files
    w8 = [m for m in q.modules() if isinstance(m, spiking.W8ASpikeLinear)]
    assert len(w8) == 32 and all(m.spike_k == 3.0 for m in w8) and q.config.spike_k == 3.0
    with pytest.raises(FileExistsError, match="pass --overwrite true"):
        convert.convert_w8aspike(ckpt=ck, out=str(tmp_path / "q"), text=str(text), calibrated=False)
    convert.convert_w8aspike(ckpt=ck, out=str(tmp_path / "q"), text=str(text), k=2.0, calibrated=False,
                             overwrite=True)
    assert "k=2.0, group_size=128, max scales" in capsys.readouterr().out
    assert convert.load_checkpoint(str(tmp_path / "q"))[1].spike_k == 2.0


def test_w8aspike_user_errors(tmp_path):
    ck = ours(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 na\u00efve".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    args = dict(ckpt=ck, out=str(tmp_path / "q"), text=str(text), n_samples=2, seq_len=16)
    for kw, err, msg in [(dict(k=0.0), ValueError, "k=0.0 must be > 0"),
                         (dict(group_size=0), ValueError, "group_size=0 must be a positive int"),
                         (dict(dtype="half"), ValueError, "dtype 'half'"),
                         (dict(text=str(tmp_path / "empty.txt")), ValueError, "empty.txt gives 0 tokens"),
                         (dict(text=str(latin)), ValueError, r"latin1.txt is not UTF-8 text \(byte 0xe9 at offset 3\)"),
                         (dict(text=str(tmp_path / "none.txt")), FileNotFoundError, "none.txt"),
                         (dict(ckpt=str(tmp_path)), FileNotFoundError, "not a checkpoint directory"),
                         (dict(out=ck), ValueError, "would replace the source")]:
        with pytest.raises(err, match=msg):
            convert.convert_w8aspike(**{**args, **kw})
    assert not os.path.exists(tmp_path / "q")
    convert.convert_w8aspike(**args)
    with pytest.raises(ValueError, match="already a W8ASpike checkpoint"):
        convert.convert_w8aspike(**{**args, "ckpt": str(tmp_path / "q"), "out": str(tmp_path / "q2")})
    # the command line: one line on stderr, no traceback
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "w8aspike", "--ckpt", str(tmp_path / "nope"),
                        "--text", str(text), "--out", str(tmp_path / "q3")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "not a checkpoint directory" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def st_header(path):
    """(header length, {name: entry}) of one safetensors file, read as bytes: the file's exact layout."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_command_writes_replace_linears_fp8(tmp_path, capsys, dtype):
    """convert.py fp8 streams what spiking.replace_linears_fp8 makes of the loaded float model: the same tensors bit for
    bit, so the loaded checkpoint gives the same logits; the projections are stored as e4m3 bits (uint8: one byte a
    weight) and float32 scales, no float copy; the rest keeps the source's dtype; spike_k and the tokenizer go along."""
    torch.manual_seed(0)
    config = Config.from_name("tiny")
    ck = str(tmp_path / "ck")
    convert.save_checkpoint(GPT(config).to(dtype), config, ck, byte_tokenizer(tmp_path / "bytes"))
    convert.convert_fp8(ckpt=ck, out=str(tmp_path / "q"))
    assert "wrote " + str(tmp_path / "q") + ": 32 FP8 layers, k=3.0" in capsys.readouterr().out
    q, t = convert.load(str(tmp_path / "q"))                              # with the tokenizer files
    ref = spiking.replace_linears_fp8(convert.load_checkpoint(ck)[0], k=3.0)
    a, b = q.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert q.config == ref.config and q.config.spike_k == 3.0 and t.n_vocab == 257
    fp8 = {n: m for n, m in q.named_modules() if isinstance(m, spiking.FP8SpikeLinear)}
    assert len(fp8) == 32 and all(m.spike_k == 3.0 for m in fp8.values())
    idx = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(q(idx)[0], ref(idx)[0])
    # the file: e4m3 bits and scales for each projection, nothing else of it; every other tensor as in the source
    n, header = st_header(tmp_path / "q" / "model.safetensors")
    header.pop("__metadata__")
    _, src = convert.read_headers(ck)
    src_name = convert.ST_NAMES[dtype]
    assert not any(k.endswith(".weight") and k.rpartition(".")[0] in fp8 for k in header)
    for name, m in fp8.items():
        assert header[name + ".fp8_weight"]["dtype"] == "U8" and header[name + ".scales"]["dtype"] == "F32"
        assert header[name + ".fp8_weight"]["shape"] == [m.out_features, m.in_features]
        assert header[name + ".scales"]["shape"] == [m.out_features]
    rest = {k: v for k, v in header.items() if k.rpartition(".")[0] not in fp8 or k.endswith(".bias")}
    assert rest.keys() == {k for k in src if k.rpartition(".")[0] not in fp8 or k.endswith(".bias")}
    assert all(v["dtype"] == src_name for v in rest.values())
    # sizes: the projections take 1 byte a weight + 4 a scale; the file is its header and its tensors, nothing more
    size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
    for name, m in fp8.items():
        assert size[name + ".fp8_weight"] == m.out_features * m.in_features and size[name + ".scales"] == 4 * m.out_features
    assert os.path.getsize(tmp_path / "q" / "model.safetensors") == 8 + n + sum(size.values())
    weights = sum(m.out_features * m.in_features for m in fp8.values())
    float_bytes = sum(math.prod(src[name + ".weight"][0]) for name in fp8) * dtype.itemsize
    assert float_bytes == weights * dtype.itemsize and sum(size[k] for k in size if ".fp8_weight" in k) == weights


def test_fp8_command_from_the_release(tmp_path):
    """A released directory (bf16 shards, a tied head made from the embedding, Hugging Face tokenizer files): renamed,
    quantized as replace_linears_fp8 quantizes the loaded release, its tokenizer converted into ours."""
    c = release_config(tie_word_embeddings=True, vocab_size=320)      # room for the tokenizer's 280 tokens
    shapes = {k: ((320, 32) if k == "model.embeddings.weight" else s)  # lm_head not stored: made from the embedding
              for k, s in release_shapes(c).items() if k != "lm_head.weight"}
    os.makedirs(tmp_path / "rel")
    write_sharded(tmp_path / "rel", random_tensors(shapes, seed=5, dtype=torch.bfloat16), 2)
    write_config(tmp_path / "rel", c)
    vocab, merges = train_bpe(corpus()[:3000], 20)
    write_hf_tokenizer(tmp_path / "rel", vocab, merges)
    convert.convert_fp8(ckpt=str(tmp_path / "rel"), out=str(tmp_path / "q"), k=2.0)
    q, qt = convert.load(str(tmp_path / "q"))
    rel, rt = convert.load(str(tmp_path / "rel"))
    ref = spiking.replace_linears_fp8(rel, k=2.0)
    a, b = q.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert a["embed.weight"].dtype == torch.bfloat16 and torch.equal(a["lm_head.weight"], a["embed.weight"])
    assert q.config.spike_k == 2.0 and qt.encode(TEXTS[0]) == rt.encode(TEXTS[0])
    idx = torch.randint(0, c["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(q(idx)[0], ref(idx)[0])


def test_fp8_loads_without_a_float_copy_of_the_projections(tmp_path, monkeypatch):
    """Loading builds the FP8 modules on the meta device and assigns the file's tensors: nothing is quantized or
    dequantized, and the e4m3 bits and scales keep their dtypes under --dtype."""
    ck = ours(tmp_path)
    convert.convert_fp8(ckpt=ck, out=str(tmp_path / "q"))
    for f in ("quantize_weight_fp8", "dequantize_weight_fp8"):
        monkeypatch.setattr(spiking, f, lambda *a, **k: pytest.fail("a float projection weight was made"))
    monkeypatch.setattr(spiking.FP8SpikeLinear, "from_linear", lambda *a, **k: pytest.fail("quantized at load"))
    q, _ = convert.load_checkpoint(str(tmp_path / "q"), dtype="bfloat16")
    up = q.get_submodule("blocks.1.mlp.up_proj")
    assert isinstance(up, spiking.FP8SpikeLinear) and up.fp8_weight.dtype == torch.uint8
    assert up.scales.dtype == torch.float32 and q.embed.weight.dtype == torch.bfloat16
    assert not any(isinstance(m, torch.nn.Linear) and m is not q.lm_head for m in q.modules())


def test_fp8_user_errors(tmp_path):
    ck = ours(tmp_path)
    args = dict(ckpt=ck, out=str(tmp_path / "q"))
    for kw, err, msg in [(dict(k=0.0), ValueError, "k=0.0 must be > 0"),
                         (dict(k=None), ValueError, "FP8 layers multiply spike counts"),
                         (dict(ckpt=str(tmp_path / "nope")), FileNotFoundError, "nope does not exist"),
                         (dict(ckpt=str(tmp_path)), FileNotFoundError, "not a checkpoint directory"),
                         (dict(out=ck), ValueError, "would replace the source")]:
        with pytest.raises(err, match=msg):
            convert.convert_fp8(**{**args, **kw})
    assert not os.path.exists(tmp_path / "q") and not leftovers(tmp_path)
    convert.convert_fp8(**args)
    with pytest.raises(FileExistsError, match="pass --overwrite true"):
        convert.convert_fp8(**args)
    w8 = spiking.replace_linears(convert.load_checkpoint(ck)[0], k=3.0, group_size=32)
    convert.save_checkpoint(w8, w8.config, str(tmp_path / "w8"))
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    for src, kind in (("w8", "a W8ASpike"), ("q", "an FP8")):          # quantized sources: refused by name, with the fix
        with pytest.raises(ValueError, match=f"already {kind} checkpoint: `convert.py fp8` quantizes float weights; "
                                             f"give it the float checkpoint"):
            convert.convert_fp8(ckpt=str(tmp_path / src), out=str(tmp_path / "q2"))
    with pytest.raises(ValueError, match="already an FP8 checkpoint: `convert.py w8aspike`"):
        convert.convert_w8aspike(ckpt=str(tmp_path / "q"), out=str(tmp_path / "q2"), text=str(text), calibrated=False)
    assert not os.path.exists(tmp_path / "q2") and not leftovers(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "fp8", "--ckpt", str(tmp_path / "q"),
                        "--out", str(tmp_path / "q3")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "already an FP8 checkpoint" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_fp8_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    ck = ours(tmp_path)
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "keep.txt").write_text("old")
    calls = []

    def failing_add(self, name, t):
        calls.append(name)
        if len(calls) % 20 == 0:
            raise OSError("disk full")
        return real_add(self, name, t)
    real_add = convert.FileWriter.add
    monkeypatch.setattr(convert.FileWriter, "add", failing_add)
    for out in ("out", "new"):
        with pytest.raises(OSError, match="disk full"):
            convert.convert_fp8(ckpt=ck, out=str(tmp_path / out), overwrite=True)
    assert os.listdir(tmp_path / "out") == ["keep.txt"] and not os.path.exists(tmp_path / "new")
    assert not leftovers(tmp_path)


# ----------------------------------------------------------------------------- tokenizer

B2U = tok.bytes_to_unicode()
CHINESE = ("自然语言处理是人工智能的一个重要方向。我们今天讨论脉冲神经网络，以及线性注意力如何降低长序列的计算成本。"
           "模型在八千个词元的上下文中训练，然后扩展到十二万八千。你好，世界！")
EMOJI = "I love it 😀👍🏽 🇨🇳🇫🇷 ❤️‍🔥 done ✅✅✅\n"


def corpus():
    import json.decoder
    import pydoc_data.topics as topics
    english = "\n\n".join(list(topics.topics.values())[:6])[:6000]
    return english + "\n" + CHINESE * 3 + "\n" + inspect.getsource(json.decoder)[:3000] + EMOJI * 3 + \
        "a  b   c    d\n\n\n\t\tx\r\n"


def train_bpe(text, n_merges):
    """A plain byte-level BPE trainer: merge the most frequent adjacent pair, repeat."""
    words = Counter(tuple(B2U[b] for b in w.encode()) for w in regex.findall(tok.QWEN_PAT, text))
    merges, vocab = [], {c: i for i, c in enumerate(B2U.values())}
    while len(merges) < n_merges:
        pairs = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                if p[0] + p[1] not in vocab:
                    pairs[p] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        new = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    return vocab, merges


def reference_encode(text, vocab, merges, specials):
    """Hugging Face's byte-level BPE, spelled out: NFC, split off added tokens, split by the pattern, then merge
    the adjacent pair listed first in merges until none is listed."""
    rank = {p: i for i, p in enumerate(merges)}
    ids = []
    split = "(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    parts = regex.split(split, text) if specials else [text]
    for part in parts:
        if part in specials:
            ids.append(specials[part])
            continue
        for piece in regex.findall(tok.QWEN_PAT, unicodedata.normalize("NFC", part)):
            word = [B2U[b] for b in piece.encode()]
            while len(word) > 1:
                r, i = min((rank.get(p, math.inf), i) for i, p in enumerate(zip(word, word[1:])))
                if r == math.inf:
                    break
                word[i:i + 2] = [word[i] + word[i + 1]]
            ids += [vocab[w] for w in word]
    return ids


SPECIALS = {"<|endoftext|>": None, "<|im_start|>": None, "<|im_end|>": None, "<tool_call>": None}
TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "自然语言处理，脉冲神经网络。你好世界！新词：量子计算",
    "def f(x):\n    return x ** 2  # square\n\n\n\nclass A:\n\tpass\n",
    "emoji 😀👍🏽🇨🇳 ❤️‍🔥 and more 🤖🧠",
    "   leading spaces and trailing      ", "a\r\nb\r\n\r\nc\n \n  \n", "tabs\t\tand\u00a0nbsp\u3000ideographic",
    "I'LL DON'T we've they'd it's", "12345 3.14159 1e-6 0x1F", "e\u0301cole cafe\u0301 naïve",
    "<|im_start|>user\nhi<|im_end|>\n<tool_call>{\"a\": 1}<|endoftext|>", "!!!???...,,,;;;", "", " ", "\n",
    "Ünïcödé ß ﬁ Ω ∑ ∫ → ⇒", "日本語のテキストと한국어 텍스트", "mixed中文English混合text123测试",
]


def write_hf_tokenizer(path, vocab, merges, with_config=True):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = {s: len(vocab) + i for i, s in enumerate(SPECIALS)}
    if with_config:
        cfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "errors": "replace",
               "added_tokens_decoder": {str(i): {"content": s, "special": s != "<tool_call>", "lstrip": False,
                                                 "rstrip": False, "normalized": False, "single_word": False}
                                        for s, i in specials.items()}}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f)
    return specials


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(corpus(), 400)


def test_tokenizer_matches_reference_bpe(tmp_path, bpe):
    vocab, merges = bpe
    assert len(merges) == 400
    specials = write_hf_tokenizer(tmp_path / "hf", vocab, merges)
    convert.convert_tokenizer(src=str(tmp_path / "hf"), out=str(tmp_path / "ours"))
    t = tok.Tokenizer(str(tmp_path / "ours"))
    assert t.special_tokens == specials and t.eos_id == specials["<|endoftext|>"]
    texts = TEXTS + [corpus()[i:i + 700] for i in range(0, 12000, 1500)]
    for text in texts:
        assert t.encode(text, specials=True) == reference_encode(text, vocab, merges, specials), text
    assert t.decode(t.encode(TEXTS[2])) == TEXTS[2]


def test_tokenizer_matches_transformers(tmp_path, bpe):
    transformers = pytest.importorskip("transformers")
    vocab, merges = bpe
    write_hf_tokenizer(tmp_path / "hf", vocab, merges)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    hf.save_pretrained(str(tmp_path / "hf_json"))   # Hugging Face's own tokenizer.json: the other input path
    for src in ("hf", "hf_json"):
        convert.convert_tokenizer(src=str(tmp_path / src), out=str(tmp_path / f"ours_{src}"))
        t = tok.Tokenizer(str(tmp_path / f"ours_{src}"))
        for text in TEXTS:
            assert t.encode(text, specials=True) == hf.encode(text, add_special_tokens=False), (src, text)


def test_tokenizer_rejects_inconsistent_merges(tmp_path, bpe):
    vocab, merges = bpe
    swapped = merges[:10] + [merges[11], merges[10]] + merges[12:]   # merge order no longer follows the ids
    write_hf_tokenizer(tmp_path / "hf", vocab, swapped)
    with pytest.raises(ValueError, match="ids must rise with merges order"):
        convert.convert_tokenizer(src=str(tmp_path / "hf"), out=str(tmp_path / "ours"))
    assert not os.path.exists(tmp_path / "ours")


def test_qwen_conversion_carries_the_tokenizer(tmp_path, bpe):
    vocab, merges = bpe
    make_qwen(tmp_path / "qwen")
    write_hf_tokenizer(tmp_path / "qwen", vocab, merges)
    convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "sb"), to="spikingbrain-7b")
    t = tok.Tokenizer(str(tmp_path / "sb"))
    assert t.encode(TEXTS[0]) == reference_encode(TEXTS[0], vocab, merges, {})


def test_bad_tokenizer_fails_before_any_weight_is_read(tmp_path, bpe, monkeypatch):
    vocab, merges = bpe
    swapped = merges[:10] + [merges[11], merges[10]] + merges[12:]
    make_qwen(tmp_path / "qwen")
    write_hf_tokenizer(tmp_path / "qwen", vocab, swapped)
    make_release(tmp_path / "rel")
    write_hf_tokenizer(tmp_path / "tok", vocab, swapped)
    streamed = []
    monkeypatch.setattr(convert, "stream", lambda *args: streamed.append(args[0]) or iter(()))
    with pytest.raises(ValueError, match="ids must rise with merges order"):
        convert.convert_qwen(src=str(tmp_path / "qwen"), out=str(tmp_path / "sb"), to="spikingbrain-7b")
    with pytest.raises(ValueError, match="ids must rise with merges order"):
        convert.convert_release(src=str(tmp_path / "rel"), out=str(tmp_path / "ours"), to="ours",
                                tokenizer=str(tmp_path / "tok"))
    assert streamed == [] and not leftovers(tmp_path)
    assert not os.path.exists(tmp_path / "sb") and not os.path.exists(tmp_path / "ours")


@pytest.mark.skipif(sys.platform != "linux", reason="reads the RSS and its peak from /proc")
def test_qwen_to_76b_streams_within_a_memory_bound(tmp_path):
    """The 76B upcycling writes every MoE layer's FFN tensors once per expert, yet holds about one source tensor at a
    time: a Qwen2 of 3 layers in one file (206 MB of float32, tensors up to 16 MB) into 2 MoE layers of 4 routed + 1
    shared experts (590 MB written) grows a fresh process's peak RSS by less than 4x the largest source tensor
    + 16 MB (59 MB measured). The peak is VmHWM after against VmRSS before (ru_maxrss would count this process's
    RSS too: Linux keeps it across exec), with glibc returning freed tensors at once (the converter's peak, not the
    allocator's retention). Reading a whole file through one safe_open (its mapped pages stay resident) took
    223 MB, scaling whole tensors in float64 104 MB."""
    c, src = make_qwen(tmp_path / "qwen", n_shards=1, hidden_size=1024, intermediate_size=4096, vocab_size=4096,
                       num_hidden_layers=3, num_attention_heads=8)
    largest = max(t.numel() * t.element_size() for t in src.values())
    script = (f"import re, sys; sys.path.insert(0, {ROOT!r}); import convert\n"
              f"kb = lambda key: int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read())[1])\n"
              f"rss = kb('VmRSS')\n"
              f"convert.convert_qwen(src={str(tmp_path / 'qwen')!r}, out={str(tmp_path / 'moe')!r}, "
              f"to='spikingbrain-76b', n_expert=4)\n"
              f"print((kb('VmHWM') - rss) * 1024)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    assert p.returncode == 0, p.stderr[-2000:]
    growth = int(p.stdout.split()[-1])
    print(f"peak RSS growth {growth / 2**20:.1f} MB, largest source tensor {largest / 2**20:.1f} MB")
    assert largest == 16 * 2**20 and growth < 4 * largest + 16 * 2**20
    _, config = convert.load_checkpoint(str(tmp_path / "moe"))
    assert config.moe_layers == [1, 2] and config.n_expert == 4

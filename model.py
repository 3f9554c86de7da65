"""SpikingBrain in one file: config presets, every layer, the model and its generation cache, in pure PyTorch.

Every op with a fast path has one dispatch line, `if kernels and kernels.use_X(...): return kernels.<op>(...)`, and
runs its reference below otherwise: copied alone, this file is a working model (CPU or GPU). Departures from a
standard (Qwen2) decoder, all from the SpikingBrain report (arXiv 2509.05276):
- `Config.layout` names each layer's token mixer: "gla" (gated linear attention, 7B), "la" (linear attention, gate
  tied to the key, 76B), "swa" (sliding-window softmax), "fa" (full causal softmax), or a pair such as "la+swa";
- GLA: ReLU feature map, low-rank log-sigmoid gate / 16, no RoPE, per-head RMSNorm on the output;
- SWA: query i sees keys i-window ... i (window+1 keys, like flash-attn window_size=(window, 0));
- optional: sink tokens seen by every softmax query; MoE FFNs (top-1 routed + a shared expert); spiking activations
  (`spike_k`: each projection's input becomes spike counts times a per-token threshold, straight-through).
"""
import typing
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import kernels   # the fast paths; without kernels.py every op runs its reference below
except ModuleNotFoundError as e:
    if e.name != "kernels":
        raise
    kernels = None

MIXERS = ("gla", "la", "swa", "fa")
LINEAR_MIXERS = ("gla", "la")


def layout_76b(n):
    """The 76B's mixers for n layers: la+fa at every 7th layer (1-indexed 7, 14, 21, 28: full to sliding-window
    attention 1:6), la+swa elsewhere; a model of fewer than 7 layers has la+fa last."""
    fa = [i for i in range(n) if (i + 1) % 7 == 0] or [n - 1]
    return ["la+fa" if i in fa else "la+swa" for i in range(n)]


def moe_layers_76b(n):
    """The 76B keeps a dense FFN in 1-indexed layers 1, 2, 3, 5, 7, 9, 11 of 28; layer i of n follows layer
    floor(i * 28 / n) of that pattern, so the dense share and its place near the input scale with depth."""
    return [i for i in range(n) if i * 28 // n + 1 not in (1, 2, 3, 5, 7, 9, 11)]


_TINY = dict(vocab_size=512, n_layer=4, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, intermediate_size=160,
             max_seq_len=4096)
# https://huggingface.co/Panyuqi/V1-7B-base/blob/main/config.json (SpikingBrain-7B release), Qwen2.5-7B dims
PRESETS = {
    "spikingbrain-7b": dict(layout=["gla", "swa"] * 14, max_seq_len=4 * 1024 * 1024),
    "spikingbrain-76b": dict(layout=layout_76b(28), n_sink=128, moe_layers=moe_layers_76b(28)),
    # https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json: the conversion source and speed baseline
    "qwen2.5-7b": dict(layout=["fa"] * 28, max_seq_len=131072),
    "tiny": dict(_TINY, window=16, layout=["gla", "swa"] * 2),
    "tiny-moe": dict(_TINY, window=16, layout=["la+swa", "la+fa", "la+swa", "la+fa"], moe_layers=[1, 3], n_expert=4,
                     n_sink=4),
    "tiny-qwen": dict(_TINY, layout=["fa"] * 4),
}


def _typed(key, value, tp):
    """A config value as its field's type tp: "3", 3 or "null" (command lines, YAML) converted, others an error."""
    import yaml
    args = typing.get_args(tp)
    optional, base = type(None) in args, next((t for t in args if t is not type(None)), tp)
    base = typing.get_origin(base) or base                                       # list[str] -> list
    if isinstance(value, str) and base is not str:
        try:
            value = base(value) if base in (int, float) else yaml.safe_load(value)   # "1e6" is a float, not YAML's
        except (ValueError, yaml.YAMLError):
            value = None if value.strip().lower() in ("null", "none", "~") else value
    if base is float and type(value) is int or base is list and isinstance(value, tuple):
        value = base(value)
    if value is None and optional or isinstance(value, base) and (base is bool or not isinstance(value, bool)):
        return value
    raise ValueError(f"config key {key}={value!r} must be {base.__name__}{' or null' if optional else ''}: fix it in "
                     f"model_config or the config.yaml")


@dataclass
class Config:
    name: str = "custom"
    vocab_size: int = 152064
    n_layer: int = 28
    n_embd: int = 3584
    n_head: int = 28
    n_kv_head: int = 4
    head_dim: int = 128
    intermediate_size: int = 18944
    norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_seq_len: int = 131072       # longest prompt + generation accepted by generate.py
    layout: list = field(default_factory=lambda: ["gla", "swa"] * 14)  # one mixer spec per layer
    window: int = 4096              # swa: query i sees keys i-window ... i
    gate_rank: int = 16             # gla: gate = Linear(n_embd, rank) -> Linear(rank, kv_dim)
    gate_norm: float = 16.0         # gla: log-gate = logsigmoid(gate) / gate_norm
    n_sink: int = 0                 # learnable sink tokens prepended to every sequence
    moe_layers: list = field(default_factory=list)  # layers whose FFN is a mixture of experts
    n_expert: int = 16
    n_shared_expert: int = 1
    top_k: int = 1
    aux_loss_coef: float = 0.01     # MoE load-balancing loss weight (applied by the trainer)
    spike_k: float | None = None    # spiking activations: threshold = mean|x| / spike_k; None = off
    init_std: float = 0.02
    bos_id: int = 151643
    eos_id: int = 151643

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):   # YAML files and command lines give "3", "null" or 3 for a float field
            setattr(self, f.name, _typed(f.name, getattr(self, f.name), hints[f.name]))
        self.layout, self.moe_layers = list(self.layout), sorted(self.moe_layers)
        if len(self.layout) != self.n_layer:
            raise ValueError(f"layout has {len(self.layout)} entries but n_layer={self.n_layer}: give one per layer")
        for i, spec in enumerate(self.layout):
            parts = spec.split("+")
            if any(p not in MIXERS for p in parts) or len(parts) != len(set(parts)) or not 1 <= len(parts) <= 2 or \
                    sum(p in LINEAR_MIXERS for p in parts) > 1:
                raise ValueError(f"layout[{i}]={spec!r}: use one of {MIXERS} or a linear+softmax pair like 'la+swa'")
        if self.n_head % self.n_kv_head or self.n_embd % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd} and be a multiple of "
                             f"n_kv_head={self.n_kv_head}")
        if any(not 0 <= i < self.n_layer for i in self.moe_layers):
            raise ValueError(f"moe_layers {self.moe_layers} must lie in 0..{self.n_layer - 1}")
        if self.moe_layers and not 1 <= self.top_k <= self.n_expert:
            raise ValueError(f"top_k={self.top_k} must be in 1..n_expert={self.n_expert}")
        check_spike_k(self.spike_k)
        if self.window < 1 or self.head_dim % 2:
            raise ValueError("window must be >= 1 and head_dim even (RoPE)")

    def mixers(self, i):
        return tuple(self.layout[i].split("+"))

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides, "name": name})

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    to_dict = asdict   # config.to_dict() -> {field: value}


# ----------------------------------------------------------------------------- spiking activations, norm, RoPE
def check_spike_k(k, what="spike_k"):
    if k is not None and not k > 0:
        raise ValueError(f"{what}={k} must be > 0 (or None to turn spiking off)")
    return k


def spike_quant(x, k=3.0):
    """Adaptive-threshold spike coding of x [..., C]: counts = round(x / vth), vth = mean|x| / k per token."""
    check_spike_k(k, "spike k")
    x = x.float()
    vth = (x.abs().mean(-1, keepdim=True) / k).clamp(1e-5, 1e4)
    return torch.round(x / vth), vth


def spike(x, k):
    """x -> counts * vth in the forward pass; identity gradient (straight-through estimator)."""
    counts, vth = spike_quant(x, k)
    return x + ((counts * vth).to(x.dtype) - x).detach()


class Linear(nn.Linear):
    """Every projection of the blocks goes through this class, so spiking can be switched per module."""
    spike_k: float | None = None

    def forward(self, x):
        x = x if self.spike_k is None else spike(x, self.spike_k)
        if kernels and kernels.use_split_bias(x, self.bias):   # a compiled decode step: the GEMV takes no bias
            return F.linear(x, self.weight) + self.bias
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_table(pos, dim, theta, dtype=torch.float32):
    """cos, sin (B, T, 1, dim/2) of positions pos [B, T]: made once per forward for every layer, not per head."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=pos.device, dtype=dtype) / dim)
    ang = pos.to(dtype)[..., None] * inv_freq                          # (B, T, dim/2)
    return ang.cos()[:, :, None], ang.sin()[:, :, None]


def rope(x, rot):
    """Rotary embedding (Qwen's half-split layout) of x [B, T, H, D] with rot = rope_table(positions)."""
    cos, sin = rot
    x1, x2 = x.to(cos.dtype).chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


# ----------------------------------------------------------------------------- gated linear attention
def gla_recurrent(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """The executable spec, one step at a time: S_t = diag(exp g_t) S_{t-1} + k_t^T v_t, o_t = (q_t*scale) S_t.
    q, k, g (log-decay <= 0): [B, T, H, K]; v: [B, T, H, V] -> o like v, final state [B, H, K, V] float32 (or 64)."""
    ct = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g = (x.transpose(1, 2).to(ct) for x in (q, k, v, g))   # (B, H, T, D)
    B, H, T, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(ct)
    o = []
    for t in range(T):
        S = g[:, :, t, :, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        o.append((q[:, :, t, None, :] * scale) @ S)
    return torch.cat(o, 2).transpose(1, 2).to(v.dtype), (S if output_final_state else None)


def gla_chunked(q, k, v, g, scale=None, initial_state=None, output_final_state=False, chunk_size=64, sub=16):
    """gla_recurrent in chunks: matmuls inside a chunk, the state passed between chunks. Every decay is exp(<= 0):
    scores between sub-chunks refer to the start of the query's sub-chunk, within a sub-chunk they are per pair."""
    B, T, H, K = q.shape
    ct, dtype = torch.promote_types(q.dtype, torch.float32), v.dtype
    scale = K ** -0.5 if scale is None else scale
    C, pad = chunk_size, -T % chunk_size
    N, ns = (T + pad) // C, C // sub
    q, k, v, g = (F.pad(x.to(ct), (0, 0, 0, 0, 0, pad)).transpose(1, 2).unflatten(2, (N, C)) for x in (q, k, v, g))
    q = q * scale                                                       # (B, H, N, C, D)
    b = g.cumsum(-2)                                                    # log-decay from chunk start
    # intra-chunk scores A[i, j] = sum_d q_id k_jd exp(b_id - b_jd), j <= i
    bs = b.unflatten(-2, (ns, sub))                                     # (B, H, N, ns, sub, K)
    ref = bs[..., :1, :]                                                # first position of each sub-chunk
    qs = q.unflatten(-2, (ns, sub)) * (bs - ref).exp()
    ks = k.unsqueeze(-3) * (ref - b.unsqueeze(-3)).clamp(max=0).exp()  # (B, H, N, ns, C, K), keys before ref
    A_off = (qs @ ks.transpose(-1, -2)).flatten(-3, -2)                 # (B, H, N, C, C)
    qd, kd = q.unflatten(-2, (ns, sub)), k.unflatten(-2, (ns, sub))
    A_diag = (qd.unsqueeze(-2) * kd.unsqueeze(-3) *
              (bs.unsqueeze(-2) - bs.unsqueeze(-3)).clamp(max=0).exp()).sum(-1)          # (.., ns, sub, sub)
    eye = torch.eye(ns, device=q.device, dtype=ct).view(ns, 1, ns, 1)
    A_diag = (A_diag.unsqueeze(-2) * eye).flatten(-4, -3).flatten(-2, -1)                # (.., C, C)
    i = torch.arange(C, device=q.device)
    off = (i[:, None] // sub) > (i[None, :] // sub)
    diag = ((i[:, None] // sub) == (i[None, :] // sub)) & (i[:, None] >= i[None, :])
    A = torch.where(off, A_off, 0.0) + torch.where(diag, A_diag, 0.0)
    o = A @ v
    # inter-chunk: read the state carried in, then fold this chunk into it
    last = b[..., -1:, :]                                               # (B, H, N, 1, K)
    k_end = k * (last - b).exp()                                        # decay from j to chunk end
    q_start = q * b.exp()                                               # decay from chunk start to i
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(ct)
    o_inter = []
    for n in range(N):
        o_inter.append(q_start[:, :, n] @ S)
        S = last[:, :, n].transpose(-1, -2).exp() * S + k_end[:, :, n].transpose(-1, -2) @ v[:, :, n]
    o = (o + torch.stack(o_inter, 2)).flatten(2, 3)[:, :, :T].transpose(1, 2)
    return o.to(dtype), (S if output_final_state else None)


def gla(q, k, v, g, initial_state=None, cu_seqlens=None):
    """GLA of q [B, T, H, D] over k, v, g [B, T, Hkv, D] (GQA: one state per kv head, serving H/Hkv query heads),
    optionally over packed documents (cu_seqlens [N + 1], B == 1). Returns (o, state [B or N, Hkv, D, D])."""
    if kernels and kernels.use_gla(q):
        return kernels.gla(q, k, v, g, initial_state, cu_seqlens)
    G = q.shape[2] // k.shape[2]
    if G > 1:   # the references keep a state per query head: G equal copies of each kv head's
        o, state = gla(q, *(t.repeat_interleave(G, 2) for t in (k, v, g)),
                       None if initial_state is None else initial_state.repeat_interleave(G, 1), cu_seqlens)
        return o, state[:, ::G]
    fn = gla_recurrent if q.shape[1] <= 4 else gla_chunked
    if cu_seqlens is None:
        return fn(q, k, v, g, initial_state=initial_state, output_final_state=True)
    return gla_documents(fn, q, k, v, g, initial_state, cu_seqlens)


@torch.compiler.disable   # a loop over the documents read on the host: compiled, every count would be another graph
def gla_documents(fn, q, k, v, g, initial_state, cu_seqlens):
    """fn (gla_recurrent or gla_chunked) over each document of a packed row (B == 1), the state restarting at each."""
    ends = cu_seqlens.tolist()
    h0 = [None] * (len(ends) - 1) if initial_state is None else initial_state.split(1)
    outs, states = zip(*(fn(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], initial_state=h, output_final_state=True)
                         for s, e, h in zip(ends, ends[1:], h0)))
    return torch.cat(outs, 1), torch.cat(states, 0)


# ----------------------------------------------------------------------------- softmax attention
def visible(q_pos, k_pos, q_doc, k_doc, window):
    """Which keys a query sees: sinks (doc -1) always; otherwise causal, within `window` (None: any distance),
    same document. No stand-in number for "no window": compiled flex masks may compute in 32 bits."""
    seen = (q_doc == k_doc) & (k_pos <= q_pos)
    if window is not None:
        seen = seen & (q_pos - k_pos <= window)
    return (k_doc == -1) | seen


def attention(q, k, v, q_pos, k_pos, q_doc, k_doc, window):
    """Masked softmax attention: q [B, T, H, D]; k, v [B, S, Hkv, D]; pos/doc [B, T] / [B, S] int -> [B, T, H, D].
    window=None is full causal attention; doc None means one document, no sinks, no cache."""
    gqa = bool(q.shape[2] != k.shape[2])   # a plain bool, also for symbolic shapes
    if q_doc is None and window is None:
        return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True,
                                              enable_gqa=gqa).transpose(1, 2)
    if q_doc is None:
        q_doc = k_doc = torch.zeros_like(q_pos)
    if kernels and kernels.use_decode_attention(q):   # one query per row over a cache
        return kernels.masked_decode_attention(q, k, v, visible(q_pos, k_pos, q_doc, k_doc, window))
    if kernels and kernels.use_flex(q):                # the mask as flex_attention's block mask, never dense
        return kernels.masked_attention(q, k, v, q_pos, k_pos, q_doc, k_doc, window, visible)
    mask = visible(q_pos[:, None, :, None], k_pos[:, None, None, :],
                   q_doc[:, None, :, None], k_doc[:, None, None, :], window)   # (B, 1, T, S)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                   # (B, nh, T, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa).transpose(1, 2)


# ----------------------------------------------------------------------------- generation cache
class KVCache(nn.Module):
    """Keys/values of one softmax branch: `n_sink` permanent slots, then a ring of `capacity` slots (SWA: window + 1;
    full attention: the whole context). Positions are stored per slot and row: the mask needs no slot order and rows
    may stand at different positions (serve.py decodes unrelated conversations together); empty slots hold EMPTY."""
    EMPTY = 1 << 62

    def __init__(self, B, n_kv, hd, n_sink, capacity, device=None, dtype=None):
        super().__init__()
        self.n_sink, self.capacity = n_sink, capacity
        S = n_sink + capacity
        self.register_buffer("k", torch.zeros(B, S, n_kv, hd, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(B, S, n_kv, hd, device=device, dtype=dtype), persistent=False)
        self.register_buffer("pos", torch.full((B, S), self.EMPTY, device=device, dtype=torch.long), persistent=False)
        self.register_buffer("doc", torch.zeros(B, S, device=device, dtype=torch.long), persistent=False)

    def write(self, k, v, pos, doc):
        """Store keys k, v (B, L, Hkv, D) at positions pos, doc (B, L) or (L,); sinks (doc -1) in their own slots."""
        B = k.shape[0]
        pos, doc = pos.expand(B, -1), doc.expand(B, -1)
        if k.shape[1] > 1:   # prefill (rows at the same positions): skip ring entries this call overwrites anyway
            keep = (doc[0] == -1) | (pos[0] > pos[0].max() - self.capacity)
            k, v, pos, doc = k[:, keep], v[:, keep], pos[:, keep], doc[:, keep]
        slot = torch.where(doc == -1, pos, self.n_sink + (pos - self.n_sink) % self.capacity)   # (B, L)
        row = torch.arange(B, device=slot.device)[:, None]
        self.k[row, slot], self.v[row, slot], self.pos[row, slot], self.doc[row, slot] = k, v, pos, doc


class Cache(nn.Module):
    """Per layer the GLA state and/or a KVCache per softmax branch; `seen` counts the positions consumed (sinks too)."""

    def __init__(self, config, B, max_len, device=None, dtype=None):
        super().__init__()
        c, self.seen = config, 0
        self.layers = nn.ModuleList()
        for i in range(c.n_layer):
            m = nn.Module()
            for kind in c.mixers(i):
                if kind in LINEAR_MIXERS:
                    m.register_buffer("state", torch.zeros(B, c.n_kv_head, c.head_dim, c.head_dim, device=device,
                                                           dtype=torch.float32), persistent=False)
                else:
                    cap = min(c.window + 1, max_len) if kind == "swa" else max_len
                    m.kv = KVCache(B, c.n_kv_head, c.head_dim, c.n_sink, cap, device, dtype)
            self.layers.append(m)

    def nbytes(self):
        return sum(b.numel() * b.element_size() for b in self.buffers())


# ----------------------------------------------------------------------------- layers
class Attention(nn.Module):
    """One layer's token mixer: one or two branches over shared q/k/v/o projections; two are RMS-normed and added."""

    def __init__(self, c, layer):
        super().__init__()
        self.c, kinds = c, c.mixers(layer)
        self.linear = next((k for k in kinds if k in LINEAR_MIXERS), None)       # gla, la or None
        self.softmax = next((k for k in kinds if k not in LINEAR_MIXERS), None)  # swa, fa or None
        kv = c.n_kv_head * c.head_dim
        self.q_proj = Linear(c.n_embd, c.n_head * c.head_dim, bias=True)
        self.k_proj = Linear(c.n_embd, kv, bias=True)
        self.v_proj = Linear(c.n_embd, kv, bias=True)
        self.o_proj = Linear(c.n_head * c.head_dim, c.n_embd, bias=False)
        if self.linear == "gla":   # low-rank gate
            self.gk_proj = nn.Sequential(Linear(c.n_embd, c.gate_rank, bias=False), Linear(c.gate_rank, kv, bias=True))
        if self.linear:
            self.g_norm = RMSNorm(c.head_dim, c.norm_eps)
        if self.linear and self.softmax:
            self.a_norm = RMSNorm(c.head_dim, c.norm_eps)    # normalizes the softmax branch

    def forward(self, x, pos, rot, doc, cu_seqlens=None, cache=None, cp=None):
        # no loop over the branches: torch.compile cannot resume a loop after the graph breaks around the kernels
        c, (B, T, _) = self.c, x.shape
        q = self.q_proj(x).view(B, T, c.n_head, c.head_dim)
        k = self.k_proj(x).view(B, T, c.n_kv_head, c.head_dim)
        v = self.v_proj(x).view(B, T, c.n_kv_head, c.head_dim)
        out = 0
        if self.linear:
            out = self.g_norm(self.linear_attention(self.linear, x, q, k, v, cu_seqlens, cache, cp))
        if self.softmax:
            o = self.softmax_attention(self.softmax, q, k, v, pos, rot, doc, cache, cp)
            out = out + (self.a_norm(o) if self.linear else o)
        return self.o_proj(out.reshape(B, T, -1))

    def softmax_attention(self, kind, q, k, v, pos, rot, doc, cache, cp=None):
        q, k = rope(q, rot), rope(k, rot)
        window = self.c.window if kind == "swa" else None
        kv = None if cache is None else cache.kv
        if cp is not None:   # one slice of a sequence split over ranks: the keys before it come from the ranks before
            return kernels.cp_attention(q, k, v, pos, doc, window, kv, cp, attention)
        if kv is None:
            if doc is None and kernels and kernels.use_band(q, window):   # only the band's tiles are computed
                return kernels.sliding_window_attention(q, k, v, 0, 0, window)
            return attention(q, k, v, pos, pos, doc, doc, window)
        if kv.n_sink == 0 and kernels and kernels.use_band(q, window):   # one document: a band again
            return kernels.band_prefill(q, k, v, pos, doc, kv, window)
        if q.shape[1] == 1 or window is None:   # the SWA ring holds window + 1 and a full buffer never wraps
            kv.write(k, v, pos, doc)
            return attention(q, kv.k, kv.v, pos, kv.pos, doc, kv.doc, window)
        o = attention(q, torch.cat([kv.k, k], 1), torch.cat([kv.v, v], 1), pos, torch.cat([kv.pos, pos], 1), doc,
                      torch.cat([kv.doc, doc], 1), window)
        kv.write(k, v, pos, doc)   # after: this chunk's keys may overwrite ring slots its queries still see
        return o

    def linear_attention(self, kind, x, q, k, v, cu_seqlens, cache, cp=None):
        c, (B, T, _) = self.c, x.shape
        ft = torch.promote_types(x.dtype, torch.float32)                 # the log-decay stays in float32
        if kind == "gla":   # ReLU feature map, low-rank gate, logit normalizer
            q, k = F.relu(q), F.relu(k)
            g = F.logsigmoid(self.gk_proj(x).to(ft)).view(B, T, c.n_kv_head, c.head_dim) / c.gate_norm
        else:               # "la": sigmoid keys, forget gate tied to the key: decay = 1 - k
            q, g = F.relu(q), F.logsigmoid(-k.to(ft))
            k = torch.sigmoid(k)
        o_sink = h = None
        s = c.n_sink if cp is None else cp.n_sink   # the sinks in this forward's rows (none once a cache holds them)
        if s and (cp is not None or cu_seqlens is not None):   # documents: the sinks run once, the state they leave
            o_sink, h = gla(q[:1, :s], k[:1, :s], v[:1, :s], g[:1, :s])   # starts every document
            q, k, v, g = (t[:, s:] for t in (q, k, v, g))
        if cp is not None:   # a slice of a split sequence: the state entering it comes from the ranks before (and
            h = cache.state if h is None and cache is not None else h   # from the prefix a cache holds)
            o, state = kernels.cp_linear(q, k, v, g, cu_seqlens, cp, gla, h)
        elif cu_seqlens is not None:   # packed documents: one flat sequence, the state restarts at each document
            h = None if h is None else h.expand(len(cu_seqlens) - 1, -1, -1, -1)
            o, state = gla(*(t.reshape(1, -1, *t.shape[2:]) for t in (q, k, v, g)), initial_state=h,
                           cu_seqlens=cu_seqlens)
            o = o.view(B, -1, *o.shape[2:])
        else:
            o, state = gla(q, k, v, g, initial_state=None if cache is None else cache.state)
        if o_sink is not None:
            o = torch.cat([o_sink.expand(B, -1, -1, -1), o], 1)
        if cache is not None:
            cache.state.copy_(state)
        return o.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = Linear(c.n_embd, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.n_embd, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinear(nn.Module):
    """E bias-free projections in one Parameter, weight [E, out, in]; forward(x, e): expert e's (spiking: Linear's)."""
    spike_k: float | None = None

    def __init__(self, n_expert, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_expert, out_features, in_features))
        nn.init.uniform_(self.weight, -in_features ** -0.5, in_features ** -0.5)   # as nn.Linear's (GPT re-inits)

    def forward(self, x, e):
        return F.linear(x if self.spike_k is None else spike(x, self.spike_k), self.weight[e])


class MoE(nn.Module):
    """Top-k routed SwiGLU experts + always-on shared experts -> (out, balance loss, share of tokens per expert)."""

    def __init__(self, c):
        super().__init__()
        self.c, E, C, I = c, c.n_expert, c.n_embd, c.intermediate_size
        self.router = nn.Linear(C, E, bias=False)
        self.experts = nn.ModuleDict(dict(gate_proj=ExpertLinear(E, C, I), up_proj=ExpertLinear(E, C, I),
                                          down_proj=ExpertLinear(E, I, C)))   # the routed experts, stacked
        self.shared = nn.ModuleList(MLP(c) for _ in range(c.n_shared_expert))

    def forward(self, x, cp=None):
        c, shape = self.c, x.shape
        x = x.reshape(-1, shape[-1])                                        # (N, C)
        probs = F.softmax(self.router(x).to(torch.promote_types(x.dtype, torch.float32)), -1)   # (N, E)
        w, idx = probs.topk(c.top_k, -1)                                    # (N, k)
        out = sum(m(x) for m in self.shared) + self.routed(x, w, idx)
        # Switch-style balance loss: E * sum_e (share of tokens routed to e) * (mean router prob of e)
        if cp is None:
            counts, psum, n = F.one_hot(idx, c.n_expert).sum((0, 1)).to(probs.dtype), probs.sum(0), idx.shape[0]
        else:   # a slice of a split sequence: the whole sequence's statistics
            counts, psum, n = kernels.cp_balance(probs, idx, shape, cp)
        load = counts / (n * c.top_k)
        aux = c.n_expert * (load * psum / n).sum()
        return out.view(shape), aux, load.detach().float()

    def routed(self, x, w, idx):
        """sum_j w[n, j] * expert idx[n, j] of x[n]; x [N, C], router weights w [N, k] (float32+), ids idx [N, k]."""
        if kernels and kernels.use_moe(x, self.experts):   # no host sync: grouped GEMMs, or gathered when decoding
            return kernels.moe_experts(x, w, idx, self.experts)
        out, p = torch.zeros_like(x), self.experts
        for e in range(self.c.n_expert):   # a host sync per expert
            tok, slot = (idx == e).nonzero(as_tuple=True)
            h = p.down_proj(F.silu(p.gate_proj(x[tok], e)) * p.up_proj(x[tok], e), e)   # expert e's SwiGLU
            out = out.index_add(0, tok, (h * w[tok, slot, None]).to(x.dtype))
        return out


class Block(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        self.attn_norm = RMSNorm(c.n_embd, c.norm_eps)
        self.attn = Attention(c, layer)
        self.mlp_norm = RMSNorm(c.n_embd, c.norm_eps)
        self.mlp = MoE(c) if layer in c.moe_layers else MLP(c)

    def forward(self, x, pos, rot, doc, cu_seqlens=None, cache=None, cp=None):
        x = x + self.attn(self.attn_norm(x), pos, rot, doc, cu_seqlens, cache, cp)
        h = self.mlp(self.mlp_norm(x), cp) if isinstance(self.mlp, MoE) else self.mlp(self.mlp_norm(x))
        h, aux = h[:2] if isinstance(h, tuple) else (h, x.new_zeros((), dtype=torch.float32))   # aux: MoE balance loss
        return x + h, aux


# ----------------------------------------------------------------------------- the model
class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.n_embd)
        self.sinks = nn.Parameter(torch.zeros(c.n_sink, c.n_embd)) if c.n_sink else None
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.set_spike_k(c.spike_k)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        # as the release (transformers' default for GLAswa): N(0, init_std) weights and sinks, zero biases, unit norms
        if isinstance(m, (nn.Linear, nn.Embedding, ExpertLinear)):
            nn.init.normal_(m.weight, std=self.config.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):   # also after a meta-device build (train.py's FSDP2 init)
            nn.init.ones_(m.weight)
        elif isinstance(m, GPT) and m.sinks is not None:
            nn.init.normal_(m.sinks, std=self.config.init_std)

    def set_spike_k(self, k):
        """Turn spiking activations on (k > 0) or off (None) for every projection of the blocks."""
        self.config.spike_k = check_spike_k(k)
        for m in self.blocks.modules():
            if hasattr(m, "spike_k"):   # model.Linear and its swaps (spiking.W8ASpikeLinear)
                m.spike_k = k

    def new_cache(self, batch_size, max_len, device=None, dtype=None):
        """Generation cache for `max_len` tokens per row (sinks come on top); SWA/GLA parts are fixed-size."""
        p = self.lm_head.weight
        return Cache(self.config, batch_size, max_len, device or p.device, dtype or p.dtype)

    def forward(self, idx, targets=None, doc_ids=None, cache=None, input_pos=None, last_only=False, cp_group=None):
        """idx [B, T] token ids -> (logits [B, T, V] or None, loss or None, aux loss). targets [B, T] (-100: no loss)
        -> the mean loss and no logits (kernels.py makes them in chunks). doc_ids [B, T]: non-decreasing document ids
        of packed rows (attention and the GLA state never cross documents). cache: a `new_cache()` to prefill or
        decode with; positions follow cache.seen (advanced here) or input_pos [B, T] (one compiled decode graph for
        every step; the caller advances cache.seen). last_only: the last position's logits (prefill). cp_group: the
        ranks splitting one sequence (kernels.cp_*): idx, doc_ids are this rank's slice, the loss its tokens' mean."""
        c, (B, T) = self.config, idx.shape
        if input_pos is None and not torch.compiler.is_compiling() and ((idx < 0) | (idx >= c.vocab_size)).any():
            raise ValueError(f"token ids must lie in [0, vocab_size={c.vocab_size}); got {idx.min()}..{idx.max()}: "
                             f"the tokenizer does not match this model")
        if cp_group is not None and kernels is None:
            raise RuntimeError("a sequence split over ranks (cp_group) runs in kernels.py: put it beside model.py")
        x = self.embed(idx)
        n_sink, pos, cp = 0, input_pos, None   # input_pos given: cache.seen is not read (a compiled step would guard)
        if input_pos is None or cp_group is not None:
            n_sink = c.n_sink if cache is None or cache.seen == 0 else 0             # sinks enter once per sequence
            base = n_sink if cache is None else cache.seen + n_sink
            if cp_group is not None:   # this rank's slice follows the ranks before it
                cp = kernels.cp_start(idx, cp_group, n_sink, doc_ids, cache, input_pos)
                base += cp.start
            pos = torch.arange(base, base + T, device=idx.device).expand(B, T)
        doc, cu_seqlens = None, None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids (packed documents) are for training and scoring: call without a cache")
            doc = doc_ids.long()   # compared within a row only, so a split row's ranks (cp) see the same ids
            # positions restart at each document's first token, after the sinks and the document's earlier ranks (cp)
            start = F.pad(doc[:, 1:] != doc[:, :-1], (1, 0), value=True)
            at = torch.arange(T, device=idx.device).expand(B, T)
            pos = at - torch.where(start, at, 0).cummax(1).values + n_sink + (0 if cp is None else cp.shift)
            if start.sum() > B:   # the linear branches see the flattened rows as documents
                cu_seqlens = F.pad(start.flatten().nonzero().flatten(), (0, 1), value=B * T).int()
                torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)   # compiled blocks: one graph for every count
        elif cache is not None or n_sink:
            doc = torch.zeros_like(pos)
        if n_sink:   # prepend the sinks; their doc id -1 makes every softmax query see them
            x = torch.cat([self.sinks.to(x.dtype).expand(B, -1, -1), x], 1)
            sink_pos = torch.arange(n_sink, device=idx.device).expand(B, n_sink)
            pos, doc = torch.cat([sink_pos, pos], 1), torch.cat([torch.full_like(sink_pos, -1), doc], 1)
        aux = x.new_zeros((), dtype=torch.float32)
        rot = rope_table(pos, c.head_dim, c.rope_theta, torch.promote_types(x.dtype, torch.float32))
        for i, block in enumerate(self.blocks):
            x, a = block(x, pos, rot, doc, cu_seqlens, None if cache is None else cache.layers[i], cp)
            aux = aux + a
        if cache is not None and input_pos is None:
            cache.seen = base + T   # base counts the sinks and, over a split sequence, the slices before this one
        x = self.norm(x[:, -1:] if last_only else x[:, n_sink:])   # prefill: not the whole chunk's norm
        if targets is not None and kernels:   # the loss in chunks, never the whole [B, T, vocab] logits
            return None, kernels.linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten()), aux
        logits = self.lm_head(x)
        if targets is not None:
            return None, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100), aux
        return logits, None, aux

    def num_params(self, active_only=False, embeddings=True):
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.embed.weight.numel() + self.lm_head.weight.numel()
        if active_only and c.moe_layers:
            per_expert = sum(p[0].numel() for p in self.blocks[c.moe_layers[0]].mlp.experts.parameters())
            n -= len(c.moe_layers) * (c.n_expert - c.top_k) * per_expert
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (MFU's numerator): 6 * active matmul params + mixing, per layer forward + backward:
        softmax 12 * H * hd * keys seen (full causal: the whole context, as PaLM's MFU), linear 12 * H * hd^2."""
        c = self.config
        keys = {"gla": c.head_dim, "la": c.head_dim, "fa": seq_len + c.n_sink,
                "swa": min(seq_len, c.window + 1) + c.n_sink}
        mix = sum(12 * c.n_head * c.head_dim * keys[kind] for i in range(c.n_layer) for kind in c.mixers(i))
        return 6 * (self.num_params(active_only=True, embeddings=False) + self.lm_head.weight.numel()) + mix


# ----------------------------------------------------------------------------- sampling
def probs_of(logits, temperature=1.0, top_k=None, top_p=None):
    """logits [B, V] -> probabilities after temperature, top-k (tokens at least as likely as the k-th) and top-p (the
    most likely tokens until their mass reaches top_p, the one crossing it included: the top token always stays)."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1:
        p, idx = probs.sort(-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)             # mass before this token already >= top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits [B, V] -> next ids [B, 1]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(probs_of(logits, temperature, top_k, top_p), 1, generator=generator)


def penalize(logits, seen, penalty):
    """Repetition penalty (CTRL, as Hugging Face): logits of tokens already in the sequence (seen [B, V] bool)
    are divided by `penalty` (a number, or [B, 1] per row) when positive and multiplied when negative."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, generator=None):
    """Up to max_new_tokens ids sampled from `model` after idx [1, T] (stopping at eos_id), through a cache: the
    prompt in one forward, then one token per forward. A short sample without a tokenizer (Generator streams text)."""
    cache = model.new_cache(idx.shape[0], idx.shape[1] + max_new_tokens)
    logits, out = model(idx, cache=cache, last_only=True)[0], []
    while len(out) < max_new_tokens and (nxt := sample(logits[:, -1], temperature, top_k, top_p, generator)) != eos_id:
        out.append(nxt.item())
        logits = model(nxt, cache=cache)[0]
    return out

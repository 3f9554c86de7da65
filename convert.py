"""Checkpoint formats: loading every kind, and conversions. Every Hugging Face tensor name lives here, in one
literal map per format.

    python convert.py qwen2.5   --src Qwen2.5-7B  --to spikingbrain-7b  --out ckpt/sb7b-init
    python convert.py qwen2.5   --src Qwen2.5-7B  --to spikingbrain-76b --out ckpt/sb76b-init
    python convert.py qwen2.5   --src Qwen2.5-7B  --to qwen2.5          --out ckpt/qwen   # same model, our format
    python convert.py dense     --src out/mini/dense/final --to spikingbrain-7b --out out/mini/sb7b-init   # ours, dense
    python convert.py release   --src V1-7B-base  --to ours    --out ckpt/sb7b
    python convert.py release   --src ckpt/sb7b   --to release --out export/sb7b --tokenizer V1-7B-base
    python convert.py tokenizer --src Qwen2.5-7B  --out assets/qwen-tokenizer
    python convert.py w8aspike  --ckpt ckpt/sb7b  --text calib.txt --out ckpt/sb7b-w8a   # INT8 weights, spikes
    python convert.py fp8       --ckpt ckpt/sb7b  --out ckpt/sb7b-fp8   # e4m3 weights, spikes counted in e4m3

(`qwen` is the same subcommand as `qwen2.5`.)

    model, tokenizer = load("ckpt/sb7b")            # any kind below; load_checkpoint(path) for the model alone

Our checkpoint is a directory: config.yaml, one model.safetensors, and the tokenizer files of tokenizer.py
(load_checkpoint also reads Hugging Face style shards + model.safetensors.index.json). Its weights are float,
W8ASpike (spiking.py's INT8 layers, recognised by their `.qweight` tensors) or FP8 (spiking.FP8SpikeLinear,
recognised by `.fp8_weight`: e4m3 bits stored as uint8, float32 `.scales` per output channel); config.yaml's spike_k
is the quantized layers' k. A released SpikingBrain-7B Hugging Face directory (config.json) loads directly too,
renamed in memory. Conversions stream tensor by tensor: our model.safetensors is laid out from the target's shapes
first and each tensor is written at its offset as it arrives, so memory holds one source tensor (and, for the
release's sharded format, the shard being filled), never a whole model. The output directory appears only when
complete.
"""
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from typing import Literal

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import spiking
import tokenizer as tok
from model import PRESETS, GPT, Config, check_spike_k, layout_76b, moe_layers_76b

DType = Literal["bfloat16", "float16", "float32", "float64"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}  # header names
ST_NAMES = {v: k for k, v in ST_DTYPES.items()} | {torch.uint8: "U8"}   # U8: written (FP8 bits), never a source
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"

# Hugging Face Qwen2 (Qwen2ForCausalLM) -> ours; "{}" is the layer index
QWEN2_MAP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{}.input_layernorm.weight": "blocks.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blocks.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "blocks.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.weight": "blocks.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "blocks.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.weight": "blocks.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "blocks.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "blocks.{}.attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blocks.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blocks.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "blocks.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "blocks.{}.mlp.down_proj.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# non-learned buffers some older Qwen2 exports carry; nothing to convert
QWEN2_IGNORED = ("model.layers.{}.self_attn.rotary_emb.inv_freq",)
# our dense (qwen2.5 layout) checkpoint -> ours: the same names; it converts through Qwen2's path with this map
DENSE_MAP = {v: v for v in QWEN2_MAP.values()}
# what a dense source fixes in the converted Config (a Qwen2 config.json's fields); the target preset gives the rest
DENSE_FIELDS = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "intermediate_size", "norm_eps",
                "rope_theta", "bos_id", "eos_id")

# the released SpikingBrain-7B (GLAswaForCausalLM, model_type gla_swa) <-> ours
RELEASE_MAP = {
    "model.embeddings.weight": "embed.weight",
    "model.layers.{}.attn_norm.weight": "blocks.{}.attn_norm.weight",
    "model.layers.{}.attn.q_proj.weight": "blocks.{}.attn.q_proj.weight",
    "model.layers.{}.attn.q_proj.bias": "blocks.{}.attn.q_proj.bias",
    "model.layers.{}.attn.k_proj.weight": "blocks.{}.attn.k_proj.weight",
    "model.layers.{}.attn.k_proj.bias": "blocks.{}.attn.k_proj.bias",
    "model.layers.{}.attn.v_proj.weight": "blocks.{}.attn.v_proj.weight",
    "model.layers.{}.attn.v_proj.bias": "blocks.{}.attn.v_proj.bias",
    "model.layers.{}.attn.o_proj.weight": "blocks.{}.attn.o_proj.weight",
    "model.layers.{}.attn.gk_proj.0.weight": "blocks.{}.attn.gk_proj.0.weight",
    "model.layers.{}.attn.gk_proj.1.weight": "blocks.{}.attn.gk_proj.1.weight",
    "model.layers.{}.attn.gk_proj.1.bias": "blocks.{}.attn.gk_proj.1.bias",
    "model.layers.{}.attn.g_norm.weight": "blocks.{}.attn.g_norm.weight",
    "model.layers.{}.mlp_norm.weight": "blocks.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blocks.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "blocks.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "blocks.{}.mlp.down_proj.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# what the release's code fixes rather than reads from config.json (its GatedLinearAttention defaults)
RELEASE_GATE_RANK, RELEASE_GATE_NORM = 16, 16.0

# parameters a Qwen2.5 checkpoint does not have, and how they start (SPEC §4: new pieces small / neutral)
NEW_PARAMS = {
    "blocks.{}.attn.gk_proj.0.weight": "gate",     # xavier-uniform, gain 2^-2.5, as the release's GLA layer
    "blocks.{}.attn.gk_proj.1.weight": "gate",
    "blocks.{}.attn.gk_proj.1.bias": "zeros",      # log-gate starts at logsigmoid(~0)/16: decay ~0.96 per step
    "blocks.{}.attn.g_norm.weight": "ones",
    "blocks.{}.attn.a_norm.weight": "ones",
    "blocks.{}.mlp.router.weight": "normal",       # N(0, init_std), the model's own init: random routing
    "sinks": "normal",
}

TARGETS = {"qwen2.5": "qwen2.5-7b", "spikingbrain-7b": "spikingbrain-7b", "spikingbrain-76b": "spikingbrain-76b"}


# ----------------------------------------------------------------------------- names and files

def template(name):
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', 3); the first number is the layer."""
    m = re.search(r"\.(\d+)\.", name)
    if m is None:
        return name, None
    return name[:m.start()] + ".{}." + name[m.end():], int(m.group(1))


def rename(name, mapping):
    """Map a concrete tensor name through a literal map with '{}' for the layer index; None if unmapped."""
    tmpl, layer = template(name)
    new = mapping.get(tmpl)
    return None if new is None else new.format(layer)


def read_path(d, name, what):
    path = os.path.join(d, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {what}")
    return path


def read_json(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {what}")
    with open(path) as f:
        return json.load(f)


def read_headers(src):
    """Tensor names of a safetensors checkpoint directory (one file, or shards with an index), from headers only.

    Returns (files in order, {name: (shape, dtype, file)}).
    """
    if os.path.isfile(os.path.join(src, INDEX)):
        weight_map = read_json(os.path.join(src, INDEX), "the shard index")["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    elif os.path.isfile(os.path.join(src, SINGLE)):
        files = [SINGLE]
    else:
        raise FileNotFoundError(f"{src} holds neither {SINGLE} nor {INDEX}: only safetensors checkpoints are read")
    headers, problems = {}, []
    for f in files:
        path = os.path.join(src, f)
        if not os.path.isfile(path):
            problems.append(f"shard {f} named by the index is missing")
            continue
        try:
            with safe_open(path, "pt") as h:
                for k in h.keys():
                    s = h.get_slice(k)
                    if k in headers:
                        problems.append(f"{k} appears in both {headers[k][2]} and {f}")
                    headers[k] = (tuple(s.get_shape()), s.get_dtype(), f)
        except Exception as e:   # a truncated or foreign file: name it
            problems.append(f"{f} cannot be read as safetensors ({e})")
    if problems:
        raise ValueError(f"{src}: unreadable checkpoint:\n  " + "\n  ".join(problems))
    return files, stacked_experts(headers, lambda hs: ((len(hs), *hs[0][0]), *hs[0][1:]))


PER_EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(.+)")   # the routed experts one tensor each, as saved before


def stacked_experts(state, stack=torch.stack):
    """A checkpoint's {name: value} with the routed experts saved one tensor per expert (`...mlp.experts.{e}.
    gate_proj.weight`, the layout before model.ExpertLinear) -> their stacked names (`...mlp.experts.gate_proj.weight`,
    stack(values in expert order)); a W8ASpike layer's group width (`._extra_state`) is one value. Others as
    they are."""
    groups, out = {}, {}
    for k, v in state.items():
        m = PER_EXPERT.fullmatch(k)
        if m:
            groups.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = v
        else:
            out[k] = v
    for k, per in groups.items():
        out[k] = per[0] if k.endswith("._extra_state") else stack([per[e] for e in sorted(per)])
    return out


def read_tensor(src, headers, name):
    """One tensor of a checkpoint directory, by the file its header entry names."""
    with safe_open(os.path.join(src, headers[name][2]), "pt") as h:
        return h.get_tensor(name)


def check_shapes(want, have, source, hint=""):
    """One error listing every missing, unexpected and mis-shaped tensor. want/have: {name: shape}."""
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k} {have[k]}" for k in sorted(set(have) - set(want))]
    problems += [f"shape of {k}: file {have[k]}, expected {want[k]}"
                 for k in sorted(set(want) & set(have)) if tuple(want[k]) != tuple(have[k])]
    if problems:
        raise ValueError(f"{source} does not match the config ({len(problems)} problems){hint}:\n  " +
                         "\n  ".join(problems))


def model_shapes(config):
    """{our name: shape} of a config, without allocating (meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}


def check_out(out, overwrite):
    """An existing non-empty `out` is replaced only with overwrite."""
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{os.path.abspath(out)} exists and is not empty; pass --overwrite true to replace it")


@contextmanager
def atomic_dir(out, overwrite=True):
    """Yield a temp directory beside `out`; on success it replaces `out` in one rename, on failure it is removed."""
    out = os.path.abspath(out)
    check_out(out, overwrite)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes 0700; the directory it becomes gets the user's usual mode
    try:
        yield tmp
        if os.path.exists(out):
            old = tmp + ".old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class FileWriter:
    """One safetensors file written in place: the header (every name, shape, dtype and offset) first, then each
    tensor at its offset as it arrives, in any order. Memory: the tensor being written."""

    def __init__(self, path, plan):
        """plan: {name: (shape, torch dtype)}."""
        header, self.offsets, end = {"__metadata__": {"format": "pt"}}, {}, 0
        for k in sorted(plan):
            shape, dtype = plan[k]
            n = math.prod(shape) * dtype.itemsize
            header[k] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [end, end + n]}
            self.offsets[k], end = end, end + n
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)   # data starts 8-byte aligned, as safetensors writes it
        self.plan, self.todo, self.base = plan, set(plan), 8 + len(h)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(h)) + h)
        self.f.truncate(self.base + end)

    def add(self, name, t):
        if name not in self.todo:
            raise ValueError(f"tensor {name} is {'written twice' if name in self.plan else 'not in the plan'}")
        if (tuple(t.shape), t.dtype) != (tuple(self.plan[name][0]), self.plan[name][1]):
            raise ValueError(f"tensor {name}: {tuple(t.shape)} {t.dtype}, planned {self.plan[name]}")
        self.f.seek(self.base + self.offsets[name])
        if t.dim() and t.stride(0) == 0:   # copies of one tensor (upcycled experts): written without stacking them
            row = t[0].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data
            for _ in range(t.shape[0]):
                self.f.write(row)
        else:
            self.f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
        self.todo.discard(name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.f.close()
        if exc_type is None and self.todo:
            raise ValueError(f"{len(self.todo)} tensors never written: {sorted(self.todo)[:10]}")


class ShardWriter:
    """Hugging Face's sharded layout: fills shards of at most `max_bytes` (one tensor may exceed it) and names them
    at close: model.safetensors when one shard suffices, else model-0000i-of-0000N.safetensors plus the index."""

    def __init__(self, path, max_bytes):
        self.path, self.max_bytes = path, max_bytes
        self.buf, self.buf_bytes, self.total = {}, 0, 0
        self.parts, self.written = [], set()     # parts: [(temp file, names)]

    def add(self, name, t):
        if name in self.written:
            raise ValueError(f"tensor {name} written twice")
        n = t.numel() * t.element_size()
        if self.buf and self.buf_bytes + n > self.max_bytes:
            self.flush()
        self.buf[name] = t.contiguous()
        self.buf_bytes += n
        self.written.add(name)

    def flush(self):
        f = f"part-{len(self.parts):05d}.tmp"
        # metadata format=pt: transformers refuses safetensors files without it
        save_file(self.buf, os.path.join(self.path, f), metadata={"format": "pt"})
        self.parts.append((f, list(self.buf)))
        self.total += self.buf_bytes
        self.buf, self.buf_bytes = {}, 0

    def close(self):
        if self.buf or not self.parts:
            self.flush()
        n = len(self.parts)
        if n == 1:
            os.replace(os.path.join(self.path, self.parts[0][0]), os.path.join(self.path, SINGLE))
            return
        weight_map = {}
        for i, (f, names) in enumerate(self.parts):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.path, f), os.path.join(self.path, final))
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.path, INDEX), "w") as f:
            json.dump(index, f, indent=2)


def stream(src, files, headers, desc):
    """Yield (name, tensor) of a checkpoint one tensor at a time, file by file, with a progress bar. Each tensor is
    read through its own opening of its file: safe_open maps the whole file, and the pages read stay resident (and
    count in RSS) until it is closed, so one opening per file would hold a whole shard by its end."""
    total = sum(math.prod(s) * st_dtype(d).itemsize for s, d, _ in headers.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, mininterval=2.0) as bar:
        for f in files:
            for k in [k for k, (_, _, kf) in headers.items() if kf == f]:
                t = read_tensor(src, headers, k)
                yield k, t
                bar.update(t.numel() * t.element_size())


def st_dtype(d):
    if d not in ST_DTYPES:
        raise ValueError(f"tensor dtype {d} is not a float type this converter handles ({sorted(ST_DTYPES)})")
    return ST_DTYPES[d]


def output_dtype(dtype, headers, src):
    """--dtype, else the source's one dtype (our file has one dtype; a mixed source needs --dtype)."""
    if dtype is not None:
        return DTYPES[dtype]
    found = sorted({d for _, d, _ in headers.values()})
    if len(found) != 1:
        raise ValueError(f"{src} mixes tensor dtypes {found}: pass --dtype")
    return st_dtype(found[0])


def resolve_dtype(dtype):
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return None if dtype is None else DTYPES[dtype]


def check_paths(src, out, overwrite=True):
    """Before any work: the source exists, --out is not it (nor holds it), and --out may be written."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source directory {src} does not exist")
    s, o = os.path.realpath(src), os.path.realpath(out)
    if o == s or s.startswith(o + os.sep):
        raise ValueError(f"--out {out} would replace the source {src}; choose another directory")
    check_out(out, overwrite)


# ----------------------------------------------------------------------------- our checkpoint directory

def save_config(config, path):
    """Our checkpoint's config.yaml: every field of model.Config, in their order."""
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)


def load_config(path):
    """A checkpoint's config.yaml, as save_config writes it. Every field must be there: one filled in from a preset or
    a default would change the model without a word (the name says nothing about dims)."""
    with open(path) as f:
        d = yaml.safe_load(f)
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds {type(d).__name__}, not a mapping of config fields")
    if missing := [f for f in Config.__dataclass_fields__ if f not in d]:
        raise ValueError(f"{path} lacks config field(s) {missing}: a saved config names every field of "
                         f"model.Config; add them with the values the weights were made with")
    return Config.from_dict(d)


def save_checkpoint(model_or_state, config, out, tokenizer_dir=None, overwrite=True):
    """Write our checkpoint directory atomically: build it under a temp name, then rename over `out`. A model
    with W8ASpike or FP8 layers saves them as they are (qweight, scales, group width; fp8_weight, scales);
    load_checkpoint reads them back."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    with atomic_dir(out, overwrite) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(tmp, SINGLE),
                  metadata={"format": "pt"})
        save_config(config, os.path.join(tmp, "config.yaml"))
        if tokenizer_dir is not None:
            tok.copy_tokenizer(tokenizer_dir, tmp)


def load_ours(path, device="cpu", dtype=None):
    """Our checkpoint directory (one model.safetensors or shards + index), float, W8ASpike or FP8 -> (model, config).

    A float checkpoint's shapes are checked from the file headers before any weight is read; errors name what is
    missing or mis-shaped.
    """
    cfg_file = os.path.join(path, "config.yaml")
    has_weights = os.path.isfile(os.path.join(path, SINGLE)) or os.path.isfile(os.path.join(path, INDEX))
    if not os.path.isdir(path) or not os.path.isfile(cfg_file) or not has_weights:
        raise FileNotFoundError(f"{path} is not a checkpoint directory: need config.yaml and {SINGLE} (or {INDEX} "
                                f"with its shards); train.py writes them, `python convert.py` makes them from "
                                f"Hugging Face files")
    config = load_config(cfg_file)
    files, headers = read_headers(path)   # a corrupt or truncated file: an error that names it
    if spiking.quantized_format(headers) is None:   # quantized: build_model checks them against their modules
        check_shapes(model_shapes(config), {k: s for k, (s, _, _) in headers.items()}, path)
    return build_model(config, read_state(path, files, device), device, dtype, path)


def checked_files(path, config):
    """The weight files of a checkpoint directory, after its headers are checked against config (one error)."""
    files, headers = read_headers(path)
    check_shapes(model_shapes(config), {k: s for k, (s, _, _) in headers.items()}, path)
    return files


def check_device(device):
    """Name an unusable device before any weights are read: safetensors failing on it reads like a bad file."""
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device name: use cpu or cuda (cuda:N)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}); "
                         f"use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
    if d.type not in ("cpu", "cuda"):
        try:
            torch.empty(0, device=d)
        except Exception as e:
            raise ValueError(f"device {device!r} cannot be used here ({str(e).splitlines()[0]}); "
                             f"use --device cpu") from None


def read_state(path, files, device="cpu"):
    """{name: tensor} of the safetensors files of a checkpoint directory; an error names a corrupt file."""
    check_device(device)
    state = {}
    for f in files:
        w_file = os.path.join(path, f)
        try:
            state.update(load_file(w_file, device=str(device)))
        except torch.OutOfMemoryError:   # the device is full, the file is fine
            raise
        except Exception as e:
            raise ValueError(f"{w_file} cannot be read as safetensors ({e}); the file is corrupt or truncated") from None
    return stacked_experts(state)


def build_model(config, state, device, dtype, source):
    """(model, config): GPT(config) holding `state`'s tensors (assigned, not copied), in dtype on device, eval mode.

    W8ASpike layers in `state` (`.qweight`) become spiking.W8ASpikeLinear modules, FP8 layers (`.fp8_weight`)
    spiking.FP8SpikeLinear; their INT8 or e4m3 weights and float32 scales keep their dtypes whatever `dtype` is. The
    modules are made on the meta device and take `state`'s tensors: no float copy of a quantized projection exists.
    """
    with torch.device("meta"):
        model = spiking.replace_linears_for_state(GPT(config), state, config.spike_k)
    check_state(model, state, source)
    if dtype is not None:
        quantized = (spiking.W8ASpikeLinear, spiking.FP8SpikeLinear)
        keep = {n + ".scales" for n, m in model.named_modules() if isinstance(m, quantized)}
        state = {k: v.to(dtype) if v.is_floating_point() and k not in keep else v for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model.to(device).eval(), config


def check_state(model, state, source):
    """One error listing every missing, unexpected and mis-shaped tensor."""
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                 {k: tuple(v.shape) for k, v in state.items()}, source)


# ----------------------------------------------------------------------------- a dense model (Qwen2.5, or ours) -> ours

def upcycle_alpha(c):
    """alpha = (1 / (S + k/N))^(1/3) (report §3.2): S shared experts, top-k of N routed."""
    return (1.0 / (c.n_shared_expert + c.top_k / c.n_expert)) ** (1.0 / 3.0)


# The report (§3.2) finds a_MoE = (S + k/N) a_dense for copied experts and takes alpha as the cube root of
# 1 / (S + k/N): one factor for each of an expert's three matrices. Scaling gate_proj too would hold only as far
# as silu is linear, so we leave gate_proj alone and give its factor to down_proj: up * alpha, down * alpha^2.
# An expert's output is linear in up and in down, so every expert is exactly FFN(x) / (S + k/N), and at init an
# upcycled layer gives FFN(x) * (S + w(x)) / (S + k/N), w(x) the summed top-k router probability (k/N when the
# router is uniform).
UPCYCLE_POWER = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}
QWEN2_ROPE_THETA = 10000.0   # Qwen2Config's theta when config.json names none (transformers 4 and 5)


def scale(t, factor, block=1 << 18):
    """t * factor in float64, rounded once to t's dtype, `block` elements at a time: memory holds t, the result and
    one block in float64, never a float64 copy of t (4x a bf16 tensor)."""
    if factor == 1:
        return t
    out = torch.empty_like(t)
    for a, b in zip(t.reshape(-1).split(block), out.view(-1).split(block)):
        b.copy_(a.double() * factor)
    return out


def read_rope(hf, default_theta):
    """(theta, problems) of a config.json's RoPE in either layout: top-level rope_theta (+ rope_scaling) as
    transformers < 5 writes it, or rope_parameters {"rope_type": "default", "rope_theta": ...} as transformers 5
    does. Only plain RoPE is implemented: a scaling kind (linear, dynamic, yarn, llama3, ...) is a problem, never
    ignored, and so are two thetas that disagree (transformers would silently prefer rope_parameters')."""
    problems, thetas = [], {}
    if hf.get("rope_theta") is not None:
        thetas["rope_theta"] = hf["rope_theta"]
    for key in ("rope_scaling", "rope_parameters"):
        p = hf.get(key)
        if p is None:
            continue
        if not isinstance(p, dict):
            problems.append(f"{key} {p!r} (expected a mapping with rope_type and rope_theta)")
            continue
        kind = p.get("rope_type", p.get("type"))
        other = sorted(k for k in p if k not in ("rope_type", "type", "rope_theta")
                       and not (k == "partial_rotary_factor" and p[k] == 1))
        if kind not in (None, "default"):
            fix = "remove rope_scaling" if key == "rope_scaling" else "set its rope_type to 'default'"
            problems.append(f"{key} rope_type {kind!r} (only plain RoPE, rope_type 'default', is implemented; "
                            f"{fix} to convert with plain RoPE)")
        elif other:
            problems.append(f"{key} sets {other} (only rope_type 'default' and rope_theta are implemented)")
        if p.get("rope_theta") is not None:
            thetas[f"{key}.rope_theta"] = p["rope_theta"]
    if hf.get("partial_rotary_factor", 1) != 1:
        problems.append(f"partial_rotary_factor {hf['partial_rotary_factor']} (RoPE on every channel is implemented)")
    if len(set(thetas.values())) > 1:
        problems.append(f"RoPE theta given twice with different values {thetas}: keep one")
    theta = next(iter(thetas.values()), default_theta)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        problems.append(f"RoPE theta {theta!r} is not a positive number")
        theta = default_theta
    return float(theta), problems


def qwen2_sliding_layers(hf):
    """Layers Qwen2 runs with anything but full attention, as transformers decides: layer_types when config.json
    has it (transformers 5 writes it), else layers max_window_layers.. when use_sliding_window is true and
    sliding_window is set."""
    if hf.get("layer_types") is not None:
        return [i for i, t in enumerate(hf["layer_types"]) if t != "full_attention"]
    if hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
        return list(range(hf.get("max_window_layers", 28), hf["num_hidden_layers"]))
    return []


def tied_head(hf, src, headers, embed):
    """Whether lm_head.weight must be made from the input embedding `embed`: tie_word_embeddings true and no
    lm_head.weight stored. Tied but stored and different, the model depends on who loads it (transformers 5 keeps
    the stored head, a plain tie would not), so that is an error, not a silent choice; both tensors are read to
    compare them (tied models are the small ones)."""
    if not hf.get("tie_word_embeddings", False):
        return False
    if "lm_head.weight" not in headers:
        return True
    if headers["lm_head.weight"][0] == headers.get(embed, (None,))[0]:   # else check_shapes names the shape
        if not torch.equal(read_tensor(src, headers, embed), read_tensor(src, headers, "lm_head.weight")):
            raise ValueError(f"{src}: config.json has tie_word_embeddings true but lm_head.weight differs from "
                             f"{embed}: set tie_word_embeddings false to keep the stored lm_head.weight, or delete "
                             f"lm_head.weight to tie it to the embedding")
    return False


def check_qwen2(hf, src):
    mt, arch = hf.get("model_type"), hf.get("architectures") or []
    if mt != "qwen2" or "Qwen2ForCausalLM" not in arch:
        hint = "; for the released SpikingBrain-7B use `convert.py release`" if mt == "gla_swa" else ""
        raise ValueError(f"{src} holds a {mt!r} checkpoint (architectures {arch}), not Qwen2: this converter reads "
                         f"Qwen2/Qwen2.5 (model_type 'qwen2', Qwen2ForCausalLM){hint}")
    # Qwen2's q/k/v always have biases and o_proj none, whatever attention_bias says (transformers ignores it):
    # the tensors decide, and check_shapes names a missing bias
    problems = read_rope(hf, QWEN2_ROPE_THETA)[1]
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (our MLP is SwiGLU: silu)")
    sliding, lt = qwen2_sliding_layers(hf), hf.get("layer_types")
    if lt is not None and len(lt) != hf["num_hidden_layers"]:
        problems.append(f"layer_types has {len(lt)} entries for {hf['num_hidden_layers']} layers")
    if sliding:
        problems.append(f"sliding-window attention in layers {sliding} (use_sliding_window "
                        f"{hf.get('use_sliding_window')}, sliding_window {hf.get('sliding_window')}, max_window_layers "
                        f"{hf.get('max_window_layers')}, layer_types {lt}): only full attention converts; Qwen2's "
                        f"sliding window is not reproduced")
    if problems:
        raise ValueError(f"{src}/config.json: unsupported settings:\n  " + "\n  ".join(problems))


def first_id(x, default):
    if isinstance(x, list):
        return x[0] if x else default
    return default if x is None else x


def target_config(dims, to, n_expert=None, n_sink=None):
    """Our Config for a dense source of `dims` (DENSE_FIELDS, and max_seq_len if it has one): the target preset,
    with its layout rules at the source's depth."""
    if to not in TARGETS:
        raise ValueError(f"--to {to!r}: choose one of {sorted(TARGETS)}")
    n = dims["n_layer"]
    d = dict(PRESETS[TARGETS[to]], **dims)
    if to == "qwen2.5":
        d.update(layout=["fa"] * n)
    elif to == "spikingbrain-7b":   # GLA on even layers, SWA on odd (the release's attn_layers = 1, 3, 5, ...)
        d.update(layout=[("gla", "swa")[i % 2] for i in range(n)])
    else:
        d.update(layout=layout_76b(n), moe_layers=moe_layers_76b(n))
        if n_expert is not None:
            d["n_expert"] = n_expert
        if n_sink is not None:
            d["n_sink"] = n_sink
    return named(Config.from_dict(dict(d, name="custom")), TARGETS[to])


def qwen_config(hf, to, n_expert=None, n_sink=None):
    """Our Config for a Qwen2 config.json: the source's dims, the target's layout rules at its depth."""
    heads = hf["num_attention_heads"]
    dims = dict(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"],
                n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=read_rope(hf, QWEN2_ROPE_THETA)[0],
                bos_id=first_id(hf.get("bos_token_id"), 151643), eos_id=first_id(hf.get("eos_token_id"), 151643))
    if to == "qwen2.5":
        dims["max_seq_len"] = hf.get("max_position_embeddings", PRESETS["qwen2.5-7b"]["max_seq_len"])
    return target_config(dims, to, n_expert, n_sink)


def named(config, preset):
    """Give config the preset's name when it is that preset up to run-time limits and token ids, else 'custom'."""
    config.name = "custom" if differs(config, Config.from_name(preset)) else preset
    return config


def differs(config, preset):
    """The fields in which two Configs differ, sorted, leaving out the name, run-time limits and token ids."""
    a, b = config.to_dict(), preset.to_dict()
    return sorted(k for k in a if k not in ("name", "max_seq_len", "bos_id", "eos_id") and a[k] != b[k])


def init_new(kind, shape, std, gen):
    t = torch.empty(shape, dtype=torch.float32)
    if kind == "gate":
        return torch.nn.init.xavier_uniform_(t, gain=2 ** -2.5, generator=gen)
    if kind == "normal":
        return torch.nn.init.normal_(t, std=std, generator=gen)
    return t.fill_(1.0 if kind == "ones" else 0.0)


def dense_tensors(name, t, config, alpha, mapping, lm_head_from_embed=False):
    """One tensor of a dense source, named as `mapping`'s keys (QWEN2_MAP, DENSE_MAP) -> the (our name, tensor)
    pairs it becomes in `config`: renamed, and in its MoE layers copied into every expert, scaled (copies share
    memory: the writer copies bytes)."""
    ours = rename(name, mapping)
    if ours == "embed.weight" and lm_head_from_embed:   # tied input/output embeddings: ours are separate
        yield "lm_head.weight", t
    _, layer = template(name)
    kind = ours.split(".")[-2]
    if ".mlp." in ours and layer in config.moe_layers:   # upcycling: shared + routed experts from the dense FFN
        scaled = scale(t, alpha ** UPCYCLE_POWER[kind])
        for s in range(config.n_shared_expert):
            yield f"blocks.{layer}.mlp.shared.{s}.{kind}.weight", scaled
        yield f"blocks.{layer}.mlp.experts.{kind}.weight", scaled.expand(config.n_expert, *scaled.shape)   # a view
    else:
        yield ours, t


def write_dense(tensors, mapping, config, out, *, dtype, seed, overwrite, tied=False, save_tokenizer=None):
    """The half both dense conversions share: `tensors` ((source name, tensor), one at a time) through
    dense_tensors into our checkpoint of `config` at `out`, then every parameter no source tensor gave, started as
    NEW_PARAMS says (seeded, in name order), config.yaml, and save_tokenizer(directory). Memory: one tensor; `out`
    appears only when complete."""
    target = model_shapes(config)
    alpha = upcycle_alpha(config) if config.moe_layers else 1.0
    with atomic_dir(out, overwrite) as tmp:
        with FileWriter(os.path.join(tmp, SINGLE), {k: (s, dtype) for k, s in target.items()}) as w:
            for name, t in tensors:
                for ours, x in dense_tensors(name, t.to(dtype), config, alpha, mapping, tied):
                    w.add(ours, x)
            gen = torch.Generator().manual_seed(seed)
            for name in sorted(w.todo):   # what no source tensor gave; sorted: the same seed gives the same weights
                kind = NEW_PARAMS.get(template(name)[0])
                if kind is None:
                    raise AssertionError(f"no source and no init rule for {name}")
                w.add(name, init_new(kind, target[name], config.init_std, gen).to(dtype))
        save_config(config, os.path.join(tmp, "config.yaml"))
        if save_tokenizer is not None:
            save_tokenizer(tmp)
    print(f"wrote {out}: {config.name} layout, {len(target)} tensors"
          + (f", upcycled MoE layers {config.moe_layers} (alpha={alpha:.4f})" if config.moe_layers else ""))


def convert_qwen(*, src: str, out: str, to: Literal["spikingbrain-7b", "spikingbrain-76b", "qwen2.5"] = "spikingbrain-7b",
                 dtype: DType | None = None, seed: int = 0, n_expert: int | None = None, n_sink: int | None = None,
                 overwrite: bool = False) -> None:
    """A local Hugging Face Qwen2/Qwen2.5 checkpoint -> our checkpoint with the target's layout.

    Every attention branch (GLA, LA, SWA, FA) reuses Qwen's q/k/v/o weights and biases; norms, MLPs and
    embeddings are copied; MoE layers (76B) are upcycled from the dense FFN; new parameters start as NEW_PARAMS
    says. The tokenizer is converted too when the source has vocab.json + merges.txt.

    Args:
        src: Hugging Face directory (config.json, model.safetensors or shards + model.safetensors.index.json).
        out: our checkpoint directory to create.
        to: target layout; qwen2.5 keeps full attention everywhere (the same model in our format).
        dtype: output dtype (default: the source's).
        seed: seed of the new parameters' initialization.
        n_expert: routed experts per MoE layer (spikingbrain-76b; default 16).
        n_sink: sink tokens (spikingbrain-76b; default 128).
        overwrite: replace `out` if it exists.
    """
    check_paths(src, out, overwrite)
    resolve_dtype(dtype)
    hf = read_json(os.path.join(src, "config.json"), "a Hugging Face checkpoint directory has config.json")
    check_qwen2(hf, src)
    config = qwen_config(hf, to, n_expert, n_sink)
    files, headers = read_headers(src)
    have = {k: s for k, (s, _, _) in headers.items() if template(k)[0] not in QWEN2_IGNORED}
    # what the source must hold: the dense full-attention model of the same dims, under Qwen2 names
    dense = Config.from_dict(dict(config.to_dict(), layout=["fa"] * config.n_layer, moe_layers=[], n_sink=0))
    inverse = {v: k for k, v in QWEN2_MAP.items()}
    want = {rename(k, inverse): s for k, s in model_shapes(dense).items()}
    tied = tied_head(hf, src, headers, "model.embed_tokens.weight")
    if tied:
        del want["lm_head.weight"]
    check_shapes(want, have, src, hint=" (expected a Qwen2 checkpoint of the dims in its config.json)")
    out_dtype = output_dtype(dtype, {k: headers[k] for k in have}, src)
    hf_tokenizer = tok.read_hf_tokenizer(src, optional=True)   # before the weights: a bad tokenizer fails at once
    write_dense(((k, t) for k, t in stream(src, files, headers, f"{to} <- {src}") if k in have), QWEN2_MAP, config,
                out, dtype=out_dtype, seed=seed, overwrite=overwrite, tied=tied,
                save_tokenizer=None if hf_tokenizer is None else lambda d: tok.save(d, *hf_tokenizer))


def check_dense(config, headers, src):
    """A source for convert_dense: our qwen2.5 layout in float weights; one error naming everything else."""
    problems = []
    if set(config.layout) != {"fa"}:
        problems.append(f"layout {config.layout} (the dense model has fa in every layer)")
    if config.moe_layers:
        problems.append(f"MoE layers {config.moe_layers}")
    if config.n_sink:
        problems.append(f"{config.n_sink} sink tokens")
    if fmt := spiking.quantized_format(headers):
        problems.append(f"{fmt} weights ({dict(W8ASpike='INT8', FP8='e4m3')[fmt]}): convert the float checkpoint "
                        f"they were made from")
    if problems:
        raise ValueError(f"{src} is not a dense checkpoint: " + "; ".join(problems) + ". `convert.py dense` reads our "
                         "qwen2.5 layout (full attention in every layer, dense FFNs, no sinks), e.g. the final/ of a "
                         "run with `model: tiny-qwen`")


def convert_dense(*, src: str, out: str, to: Literal["spikingbrain-7b", "spikingbrain-76b"] = "spikingbrain-7b",
                  dtype: DType | None = None, seed: int = 0, n_expert: int | None = None, n_sink: int | None = None,
                  overwrite: bool = False) -> None:
    """Our dense checkpoint (the qwen2.5 layout, e.g. train.py's out_dir/final of a `tiny-qwen` run) -> the target's
    layout, converted as `convert_qwen` converts Qwen2.5: the same code (write_dense) with DENSE_MAP for QWEN2_MAP,
    so every branch reuses q/k/v/o, MoE layers are upcycled and new parameters start as NEW_PARAMS says. Our
    tokenizer files are copied.

    Args:
        src: our checkpoint directory (config.yaml, model.safetensors or shards + index).
        out: our checkpoint directory to create.
        to: target layout.
        dtype: output dtype (default: the source's).
        seed: seed of the new parameters' initialization.
        n_expert: routed experts per MoE layer (spikingbrain-76b; default 16).
        n_sink: sink tokens (spikingbrain-76b; default 128).
        overwrite: replace `out` if it exists.
    """
    check_paths(src, out, overwrite)
    resolve_dtype(dtype)
    source = load_config(read_path(src, "config.yaml", "`convert.py dense` reads our checkpoint directory (a "
                                                       "run's final/); a Hugging Face Qwen2 directory converts with "
                                                       "`convert.py qwen2.5`"))
    files, headers = read_headers(src)
    check_dense(source, headers, src)
    check_shapes(model_shapes(source), {k: s for k, (s, _, _) in headers.items()}, src)
    config = target_config({k: getattr(source, k) for k in DENSE_FIELDS}, to, n_expert, n_sink)
    out_dtype = output_dtype(dtype, headers, src)

    write_dense(stream(src, files, headers, f"{to} <- {src}"), DENSE_MAP, config, out, dtype=out_dtype, seed=seed,
                overwrite=overwrite,
                save_tokenizer=(lambda d: tok.copy_tokenizer(src, d)) if tok.has_tokenizer(src) else None)


# ----------------------------------------------------------------------------- released SpikingBrain-7B <-> ours

def release_to_config(hf, src):
    """The release's config.json -> our Config (7B layout: GLA layers, SWA at attn_layers)."""
    mt, arch = hf.get("model_type"), hf.get("architectures") or []
    if mt != "gla_swa":
        raise ValueError(f"{src} holds a {mt!r} checkpoint (architectures {arch}), not the SpikingBrain-7B release "
                         f"(model_type 'gla_swa', GLAswaForCausalLM)")
    n, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    # defaults: GLAswaConfig's, for fields config.json omits
    theta, problems = read_rope(hf, 1e6)
    if hf.get("use_short_conv", False):
        problems.append("use_short_conv true (short convolutions are not modeled)")
    if hf.get("hidden_act", "swish") not in ("swish", "silu"):
        problems.append(f"hidden_act {hf['hidden_act']!r} (our MLP is SwiGLU: swish/silu)")
    if not hf.get("elementwise_affine", True):
        problems.append("elementwise_affine false (our norms have weights)")
    if hf.get("enable_spike", False):
        problems.append("enable_spike true (the release's spiking path is not converted; ours is spike_k)")
    if hf.get("head_dim", hf["hidden_size"] // heads) != hf["hidden_size"] // heads:
        problems.append(f"head_dim {hf['head_dim']} (the release's layers use hidden_size / num_attention_heads = "
                        f"{hf['hidden_size'] // heads})")
    for key, fixed in (("gate_low_rank_dim", RELEASE_GATE_RANK), ("gate_logit_normalizer", RELEASE_GATE_NORM)):
        if hf.get(key, fixed) != fixed:
            problems.append(f"{key} {hf[key]} (the release's GLA layers fix it at {fixed:g})")
    window = hf.get("sliding_window", 4096)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        problems.append(f"sliding_window {window!r} (the attn_layers need a window of at least 1 token)")
    attn = hf.get("attn_layers", list(range(1, n, 2)))   # the release's default when config.json omits it
    bad = [i for i in attn if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad:
        problems.append(f"attn_layers {attn}: {bad} are not layer indices 0..{n - 1}")
    if problems:
        raise ValueError(f"{src}/config.json: unsupported settings:\n  " + "\n  ".join(problems))
    attn = set(attn)
    config = Config(name="custom", vocab_size=hf["vocab_size"], n_layer=n, n_embd=hf["hidden_size"],
                    n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads,
                    head_dim=hf["hidden_size"] // heads, intermediate_size=hf["intermediate_size"],
                    norm_eps=hf.get("norm_eps", 1e-6), rope_theta=theta,
                    max_seq_len=hf.get("max_position_embeddings", 131072),
                    layout=["swa" if i in attn else "gla" for i in range(n)], window=window,
                    gate_rank=RELEASE_GATE_RANK, gate_norm=RELEASE_GATE_NORM,
                    init_std=hf.get("initializer_range", 0.02),
                    bos_id=first_id(hf.get("bos_token_id"), 151643), eos_id=first_id(hf.get("eos_token_id"), 151643))
    return named(config, "spikingbrain-7b")


def config_to_release(c, torch_dtype):
    """Our Config -> the release's config.json (same fields as the published one); error if it cannot say it."""
    problems = [f"layout[{i}]={m!r} (the release has gla and swa layers only)"
                for i, m in enumerate(c.layout) if m not in ("gla", "swa")]
    if c.moe_layers:
        problems.append(f"moe_layers {c.moe_layers} (the release has dense FFNs)")
    if c.n_sink:
        problems.append(f"n_sink {c.n_sink} (the release has no sink tokens)")
    if c.n_head * c.head_dim != c.n_embd:
        problems.append(f"n_head * head_dim = {c.n_head * c.head_dim} != n_embd {c.n_embd} (the release derives "
                        f"head_dim = hidden_size / num_attention_heads)")
    if (c.gate_rank, c.gate_norm) != (RELEASE_GATE_RANK, RELEASE_GATE_NORM):
        problems.append(f"gate_rank {c.gate_rank} / gate_norm {c.gate_norm} (the release fixes both at 16)")
    if c.spike_k is not None:
        problems.append(f"spike_k {c.spike_k} (the release's HF model does not spike; set spike_k: null in "
                        f"config.yaml to export the weights)")
    if problems:
        raise ValueError("this checkpoint cannot be written in the release's format:\n  " + "\n  ".join(problems))
    return {
        "architectures": ["GLAswaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_gla_swa.GLAswaConfig",
                     "AutoModelForCausalLM": "modeling_gla_swa.GLAswaForCausalLM"},
        "attention_dropout": 0.0,
        "attn_layers": [i for i, m in enumerate(c.layout) if m == "swa"],
        "attn_mode": "chunk",
        "bos_token_id": c.bos_id,
        "conv_size": 4,
        "elementwise_affine": True,
        "eos_token_id": c.eos_id,
        "fuse_cross_entropy": True,
        "hidden_act": "swish",
        "hidden_size": c.n_embd,
        "initializer_range": c.init_std,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_seq_len,
        "model_type": "gla_swa",
        "norm_eps": c.norm_eps,
        "num_attention_heads": c.n_head,
        "num_hidden_layers": c.n_layer,
        "num_key_value_heads": c.n_kv_head,
        "rope_theta": c.rope_theta,
        "sliding_window": c.window,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.45.0",
        "use_cache": True,
        "use_short_conv": False,
        "vocab_size": c.vocab_size,
    }


def read_release(src):
    """A release directory's Config and tensor headers, checked against each other (one error for all)."""
    hf = read_json(os.path.join(src, "config.json"), "the release directory has config.json")
    config = release_to_config(hf, src)
    files, headers = read_headers(src)
    inverse = {v: k for k, v in RELEASE_MAP.items()}
    want = {rename(k, inverse): s for k, s in model_shapes(config).items()}
    tied = tied_head(hf, src, headers, "model.embeddings.weight")
    if tied:   # the release ties nothing, but its config allows it; ours keeps lm_head separate
        del want["lm_head.weight"]
    check_shapes(want, {k: s for k, (s, _, _) in headers.items()}, src)
    return config, files, headers, tied


def load_release(path, device="cpu", dtype=None):
    """A released SpikingBrain-7B directory -> (model, config), renamed in memory (nothing written)."""
    config, files, headers, tied = read_release(path)
    state = {rename(k, RELEASE_MAP): v for k, v in read_state(path, files, device).items()}
    if tied:
        state["lm_head.weight"] = state["embed.weight"].clone()
    return build_model(config, state, device, dtype, path)


def convert_release(*, src: str, out: str, to: Literal["ours", "release"], dtype: DType | None = None,
                    tokenizer: str | None = None, max_shard_gb: float = 5.0, overwrite: bool = False) -> None:
    """The released SpikingBrain-7B Hugging Face directory <-> our checkpoint. Tensors are renamed, never changed
    (unless --dtype), so release -> ours -> release reproduces every tensor bit for bit.

    Args:
        src: --to ours: the release directory (config.json, safetensors); --to release: our checkpoint.
        out: directory to create. For --to release it holds config.json and the weights as shards + index; put
            the release's hf_7B_model/*.py files beside them to load it with trust_remote_code.
        to: which format to write.
        dtype: output dtype (default: the source's).
        tokenizer: --to ours: Hugging Face tokenizer directory to convert (default: src when it has one);
            --to release: Hugging Face tokenizer files to copy into out. Given, it must hold a tokenizer.
        max_shard_gb: shard size limit in GB of the release format (ours is one file).
        overwrite: replace `out` if it exists.
    """
    check_paths(src, out, overwrite)
    out_dtype = resolve_dtype(dtype)
    if to == "ours":
        config, files, headers, tied = read_release(src)
        out_dtype = output_dtype(dtype, headers, src)
        # before the weights: a bad tokenizer, or --tokenizer without one, fails at once
        hf_tokenizer = tok.read_hf_tokenizer(tokenizer or src, optional=tokenizer is None)
        with atomic_dir(out, overwrite) as tmp:
            plan = {k: (s, out_dtype) for k, s in model_shapes(config).items()}
            with FileWriter(os.path.join(tmp, SINGLE), plan) as w:
                for name, t in stream(src, files, headers, f"ours <- {src}"):
                    new = rename(name, RELEASE_MAP)
                    w.add(new, t.to(out_dtype))
                    if tied and new == "embed.weight":
                        w.add("lm_head.weight", t.to(out_dtype))
            save_config(config, os.path.join(tmp, "config.yaml"))
            if hf_tokenizer is not None:
                tok.save(tmp, *hf_tokenizer)
    elif to == "release":
        config = load_config(read_path(src, "config.yaml", "--to release reads our checkpoint directory"))
        files, headers = read_headers(src)
        check_shapes(model_shapes(config), {k: s for k, (s, _, _) in headers.items()}, src)
        # before writing anything: can the release's config.json say this model, is the tokenizer there?
        written = out_dtype or st_dtype(headers["embed.weight"][1])
        release = config_to_release(config, str(written).removeprefix("torch."))
        if tokenizer is not None and not tok.has_hf_tokenizer(tokenizer):
            raise FileNotFoundError(f"--tokenizer {tokenizer} holds no Hugging Face tokenizer (vocab.json + "
                                    f"merges.txt or tokenizer.json)")
        to_release = {v: k for k, v in RELEASE_MAP.items()}
        with atomic_dir(out, overwrite) as tmp:
            w = ShardWriter(tmp, int(max_shard_gb * 1e9))
            for name, t in stream(src, files, headers, f"release <- {src}"):
                w.add(rename(name, to_release), t if out_dtype is None else t.to(out_dtype))
            w.close()
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(release, f, indent=2)
            for f in tok.HF_TOKENIZER_FILES if tokenizer else ():
                if os.path.isfile(os.path.join(tokenizer, f)):
                    shutil.copy(os.path.join(tokenizer, f), tmp)
    else:
        raise ValueError(f"--to {to!r}: choose 'ours' or 'release'")
    print(f"wrote {out} ({'our checkpoint' if to == 'ours' else 'release format'}, {len(headers)} tensors)")


# ----------------------------------------------------------------------------- loading any checkpoint

def checkpoint_kind(path):
    """'ours' (config.yaml: float, W8ASpike or FP8) or 'release' (a released SpikingBrain-7B directory, config.json)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a checkpoint directory: give one written by train.py or convert.py, "
                                f"or a released SpikingBrain-7B directory")
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return "ours"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "release"
    raise FileNotFoundError(f"{path} is not a checkpoint directory: it holds neither config.yaml (ours: train.py and "
                            f"convert.py write one) nor config.json (a released SpikingBrain-7B Hugging Face directory)")


def read_config(ckpt):
    """The Config of any checkpoint directory (ours, or a released one's config.json), without reading weights."""
    if checkpoint_kind(ckpt) == "ours":
        return load_config(os.path.join(ckpt, "config.yaml"))
    return release_to_config(read_json(os.path.join(ckpt, "config.json"), ""), ckpt)


def load_checkpoint(path, device="cpu", dtype=None):
    """Any checkpoint directory -> (model, config), eval mode, on `device`: ours (config.yaml + model.safetensors or
    shards + index), float, W8ASpike or FP8, or a released SpikingBrain-7B Hugging Face directory (config.json).

    dtype: a torch dtype or its name (default: as saved); quantized layers keep float32 scales and 8-bit weights.
    """
    kind = checkpoint_kind(path)
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    return (load_ours if kind == "ours" else load_release)(path, device, dtype)


def load_tokenizer(ckpt, tokenizer_dir=None):
    """The tokenizer of checkpoint directory `ckpt` (our files, or Hugging Face ones converted on the fly), or the one
    in tokenizer_dir; checked against the checkpoint's vocabulary before any weight is read."""
    checkpoint_kind(ckpt)   # a clear error for a path that is no checkpoint, before the tokenizer is looked for
    src = tokenizer_dir or ckpt
    tokenizer = tok.open_tokenizer(src)
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer in {src} (tokenizer.tiktoken + tokenizer.json, or Hugging Face "
                                f"vocab.json + merges.txt): pass --tokenizer DIR")
    config = read_config(ckpt)
    if tokenizer.n_vocab > config.vocab_size:
        raise ValueError(f"tokenizer of {src} has {tokenizer.n_vocab} tokens but the model of {ckpt} only "
                         f"{config.vocab_size}: they do not belong together")
    return tokenizer


def load(ckpt, device="cpu", dtype=None, tokenizer_dir=None):
    """Any checkpoint directory -> (model, tokenizer): load_tokenizer (first: it fails fast), then load_checkpoint."""
    tokenizer = load_tokenizer(ckpt, tokenizer_dir)
    return load_checkpoint(ckpt, device, dtype)[0], tokenizer


# ----------------------------------------------------------------------------- float -> W8ASpike, float -> FP8

def text_rows(tokenizer, text_file, seq_len, max_tokens=None):
    """Tokenize a UTF-8 text file and cut it into rows [N, seq_len + 1] (one shorter row if the text is short):
    calibration here, perplexity in eval.py."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    try:
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{text_file} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                         f"convert it first, e.g. iconv -f latin1 -t utf-8 {text_file}") from None
    ids = tokenizer.encode(text)
    ids = ids[:max_tokens] if max_tokens else ids
    if len(ids) < 2:
        raise ValueError(f"{text_file} gives {len(ids)} tokens: need at least 2 to measure perplexity")
    n = max(1, len(ids) // (seq_len + 1))
    width = min(seq_len + 1, len(ids))
    return torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)


def check_float(ckpt, fmt, command):
    """A quantizing command reads float weights: a W8ASpike or FP8 checkpoint (fmt) is refused, with the fix."""
    if fmt:
        raise ValueError(f"{ckpt} is already {'an' if fmt == 'FP8' else 'a'} {fmt} checkpoint: `convert.py {command}` "
                         f"quantizes float weights; give it the float checkpoint {ckpt} was made from")


def convert_w8aspike(*, ckpt: str, out: str, text: str, k: float = 3.0, group_size: int = 128,
                     n_samples: int = 128, seq_len: int = 512, batch_size: int = 4, calibrated: bool = True,
                     device: str = "cpu", dtype: DType | None = None, tokenizer: str | None = None,
                     overwrite: bool = False) -> None:
    """A float checkpoint -> W8ASpike (spiking.py: INT8 weights in groups of input channels, spike-count inputs),
    saved as our checkpoint with the tokenizer files.

    Args:
        ckpt: float checkpoint directory (ours, or a released SpikingBrain-7B directory)
        out: directory to write
        text: calibration text, cut into n_samples rows of seq_len tokens
        k: activation threshold parameter
        group_size: input channels per INT8 weight scale (the last group of a row may be shorter)
        n_samples: calibration rows
        seq_len: tokens per calibration row
        batch_size: rows per forward
        calibrated: search clip ratios on the text (False: plain max|w| / 127 scales)
        device: cpu or cuda
        dtype: e.g. bfloat16; default: as saved
        tokenizer: tokenizer directory, if not the checkpoint's
        overwrite: replace `out` if it exists.
    """
    check_spike_k(k, "k")            # the arguments and files are checked before the model loads
    if calibrated and n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be >= 1")
    spiking.check_group_size(group_size)
    resolve_dtype(dtype)
    if calibrated:
        rows = text_rows(load_tokenizer(ckpt, tokenizer), text, seq_len, n_samples * (seq_len + 1))
    check_paths(ckpt, out, overwrite)   # --out must not replace the float checkpoint it reads
    model, config = load_checkpoint(ckpt, device, dtype)
    check_float(ckpt, spiking.quantized_format(model), "w8aspike")
    scales, n_rows = None, 0
    if calibrated:
        scales = spiking.calibrate(model, rows.split(batch_size), n_samples=n_samples, k=k, group_size=group_size)
        n_rows = min(n_samples, rows.shape[0])
    spiking.replace_linears(model, k=k, group_size=group_size, scales=scales)
    tok_dir = tokenizer or ckpt
    save_checkpoint(model, config, out, tok_dir if tok.has_tokenizer(tok_dir) else None, overwrite)
    n = sum(isinstance(m, spiking.W8ASpikeLinear) for m in model.modules())
    print(f"wrote {out}: {n} W8ASpike layers, k={k}, group_size={group_size}, "
          f"{f'calibrated on {n_rows} rows of {rows.shape[1]} tokens' if calibrated else 'max scales'}")


def read_float(ckpt, command):
    """A float checkpoint from its headers, ours or a released directory: (config, files, headers, {source name: our
    name}, whether lm_head is the tied embedding). Quantized checkpoints are refused (check_float)."""
    if checkpoint_kind(ckpt) == "release":
        config, files, headers, tied = read_release(ckpt)
        return config, files, headers, {k: rename(k, RELEASE_MAP) for k in headers}, tied
    config = load_config(os.path.join(ckpt, "config.yaml"))
    files, headers = read_headers(ckpt)
    check_float(ckpt, spiking.quantized_format(headers), command)
    check_shapes(model_shapes(config), {k: s for k, (s, _, _) in headers.items()}, ckpt)
    return config, files, headers, {k: k for k in headers}, False


def convert_fp8(*, ckpt: str, out: str, k: float = 3.0, tokenizer: str | None = None, overwrite: bool = False) -> None:
    """A float checkpoint -> FP8: every projection of the blocks a spiking.FP8SpikeLinear (e4m3 weights, one float32
    scale per output channel, spike-count inputs at k), saved as our checkpoint with the tokenizer files. Streamed
    as the other conversions: each projection's weight is quantized as it is read and only its e4m3 bits (uint8)
    and scales are written; every other tensor (embeddings, norms, lm_head, routers, sinks, the projections'
    biases) is copied in its own dtype. The result is spiking.replace_linears_fp8 of the loaded float model, tensor
    for tensor, and convert.load builds FP8SpikeLinear modules from it.

    Args:
        ckpt: float checkpoint directory (ours, or a released SpikingBrain-7B directory)
        out: directory to write
        k: activation threshold parameter of the spike counts (saved as the config's spike_k)
        tokenizer: tokenizer directory, if not the checkpoint's (ours is copied, Hugging Face files converted)
        overwrite: replace `out` if it exists.
    """
    if k is None:
        raise ValueError("FP8 layers multiply spike counts: give a k > 0")
    check_spike_k(k, "k")
    check_paths(ckpt, out, overwrite)   # --out must not replace the float checkpoint it reads
    config, files, headers, names, tied = read_float(ckpt, "fp8")
    config.spike_k = k
    with torch.device("meta"):   # the target's modules and tensor shapes, nothing allocated
        model = spiking.replace_linears_fp8(GPT(config), k=k)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, spiking.FP8SpikeLinear)}
    dtypes = {names[s]: st_dtype(d) for s, (_, d, _) in headers.items()}
    if tied:
        dtypes["lm_head.weight"] = dtypes["embed.weight"]
    plan = {n: (tuple(t.shape), t.dtype if n.rpartition(".")[0] in fp8 and not n.endswith(".bias") else dtypes[n])
            for n, t in model.state_dict().items()}
    tok_src = tokenizer or ckpt   # ours is copied; Hugging Face files (a release directory) are converted
    has_ours = tok.has_tokenizer(tok_src)
    hf_tokenizer = None if has_ours else tok.read_hf_tokenizer(tok_src, optional=tokenizer is None)
    with atomic_dir(out, overwrite) as tmp:
        with FileWriter(os.path.join(tmp, SINGLE), plan) as w:
            for name, t in stream(ckpt, files, headers, f"fp8 <- {ckpt}"):
                name = names[name]
                layer, _, leaf = name.rpartition(".")
                if layer in fp8 and leaf == "weight":
                    bits, scales = spiking.quantize_weight_fp8(t)
                    w.add(layer + ".fp8_weight", bits)
                    w.add(layer + ".scales", scales)
                else:
                    w.add(name, t)
                if tied and name == "embed.weight":
                    w.add("lm_head.weight", t)
        save_config(config, os.path.join(tmp, "config.yaml"))
        if has_ours:
            tok.copy_tokenizer(tok_src, tmp)
        elif hf_tokenizer is not None:
            tok.save(tmp, *hf_tokenizer)
    weights = {n: math.prod(plan[n + ".fp8_weight"][0]) for n in fp8}
    e4m3 = sum(weights.values()) + sum(4 * plan[n + ".scales"][0][0] for n in fp8)
    source = sum(v * dtypes[n + ".weight"].itemsize for n, v in weights.items())
    print(f"wrote {out}: {len(fp8)} FP8 layers, k={k}; their weights take {e4m3 / 1e6:,.1f} MB as e4m3 + scales "
          f"({source / 1e6:,.1f} MB in {ckpt})")


# ----------------------------------------------------------------------------- tokenizer: vocab.json + merges.txt -> tiktoken

def convert_tokenizer(*, src: str, out: str, overwrite: bool = False) -> None:
    """Hugging Face vocab.json + merges.txt (+ added tokens) -> our tokenizer directory (tokenizer.tiktoken with the
    ranks, tokenizer.json with the split pattern and special tokens) that encodes like the Hugging Face tokenizer.

    Args:
        src: Hugging Face tokenizer directory (vocab.json + merges.txt, or tokenizer.json).
        out: directory to create.
        overwrite: replace `out` if it exists.
    """
    check_paths(src, out, overwrite)
    ranks, specials, pat_str, eos, normalize = tok.read_hf_tokenizer(src)
    with atomic_dir(out, overwrite) as tmp:
        tok.save(tmp, ranks, specials, pat_str=pat_str, eos=eos, normalize=normalize)
    print(f"wrote {out}: {len(ranks)} ranks, {len(specials)} special tokens")


if __name__ == "__main__":
    from jsonargparse import CLI

    # jsonargparse reads a dot in a subcommand name as nesting: it lists and helps "qwen2.5" but cannot run it. So
    # help and every other command see "qwen2.5", and a Qwen conversion (qwen2.5 or qwen) runs under "qwen".
    args = sys.argv[1:]
    runs_qwen = args[:1] in (["qwen"], ["qwen2.5"]) and not {"-h", "--help"} & set(args)
    qwen = "qwen" if runs_qwen else "qwen2.5"
    args = [qwen if a in ("qwen", "qwen2.5") else a for a in args[:1]] + args[1:]
    try:
        CLI({qwen: convert_qwen, "dense": convert_dense, "release": convert_release, "tokenizer": convert_tokenizer,
             "w8aspike": convert_w8aspike, "fp8": convert_fp8}, args=args)
    except (ValueError, OSError) as e:   # bad input: the message says what and where, a traceback adds nothing
        sys.exit(f"error: {e}")

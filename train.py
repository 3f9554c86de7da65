"""Train SpikingBrain with Lightning Fabric: the CPU demo, continual pre-training (CPT) from a converted Qwen2.5
and supervised fine-tuning (SFT). `main` sets a run up and `fit` is its loop; every flag is a parameter of `main`.

    python train.py --config configs/tiny.yaml                     # the demo: a tiny SpikingBrain on Python's docs, CPU
    python train.py --config configs/tiny.yaml --resume auto       # continue from the newest checkpoint in out_dir
    python train.py --config configs/tiny.yaml --devices 2 --accelerator cpu --strategy fsdp   # FSDP2, 2 processes
    python train.py --config configs/tiny.yaml --devices 2 --accelerator cpu --context_parallel 2   # rows split in 2
    python train.py --config configs/cpt-7b-8k.yaml --devices 8    # CPT stage 1 on one 8-GPU node (FSDP2)
    python train.py --config configs/cpt-76b-8k.yaml --devices 8 --num_nodes 8 --dry_run true  # memory plan only
    python train.py prepare --inputs corpus/ chats.jsonl --out data/mine --tokenizer_dir DIR  # -> token shards
    python train.py tokenizer --out assets/tokenizer               # rebuild the demo tokenizer (deterministic, ~5 s)
    python train.py --config configs/tiny.yaml --print_config      # every option with its value

Multi-node: run the same command on every node with --num_nodes N; Fabric reads the rank from torchrun or SLURM.
A run writes out_dir/step-XXXXXXX/ (resumable, sharded under FSDP), out_dir/logs/ (TensorBoard) and out_dir/final/
(one consolidated model.safetensors + config.yaml + tokenizer: what generate.py and eval.py load).

Data lives in data.py: `train.py prepare` is data.prepare (its docstring gives the shard format) and the rows are
data.Packed. Documents end with <|endoftext|> and are packed back to back into rows of seq_len tokens. Document ids
go with every row, so positions restart, softmax attention stays inside a document and the GLA state resets at
each document start; no target crosses a document boundary. SFT data (chat `messages`) is ChatML with a loss only
on what the assistant wrote. `train.py tokenizer` is data.build_tokenizer.
"""
import json
import math
import os
import pickle
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

import convert
import kernels
from data import Packed, build_tokenizer, prepare, train_rows
from model import GPT, MoE, PRESETS, Config, ExpertLinear, Linear, generate, spike_quant
from tokenizer import Tokenizer


@dataclass
class DataArgs:
    """Training data.

    Args:
        path: a directory written by `train.py prepare` (token shards, document index, meta.json).
        inputs: if `path` is not prepared yet, prepare it from these files, directories, 'pydoc' or 'stdlib' first.
        val_fraction: share of the documents held out for validation when preparing from `inputs`.
        doc_mask: pass document ids: attention and GLA state stop at document boundaries.
    """
    path: Path = Path("data/pydoc")
    inputs: Optional[list[str]] = None
    val_fraction: float = 0.1
    doc_mask: bool = True


@dataclass
class TrainArgs:
    """Optimization.

    Args:
        seq_len: tokens per row.
        micro_batch_size: rows per device per forward/backward (lowered to fit global_batch_size if it must be).
        global_batch_size: rows per optimizer step over all devices; gradient accumulation makes up the rest.
        max_tokens: training length in tokens (the report's budgets), or ...
        max_steps: ... in optimizer steps (wins if both are given).
        lr: peak learning rate, reached after the warmup.
        min_lr: the cosine schedule ends here.
        warmup_steps: optimizer steps of linear warmup from 0 to lr.
        weight_decay: AdamW decay on matrices only, not on norms, biases, sinks.
        betas: AdamW betas.
        grad_clip: the gradient norm is clipped to this.
        activation_checkpointing: recompute blocks in backward, keeping only their inputs: true (every block), an
            int N (the first N blocks; the rest keep their activations) or auto (as few blocks as the memory plan
            fits in AUTO_MEMORY_SHARE of the GPU's memory: the fastest that fits; every block on a CPU).
        compile: torch.compile each block.
        reshard_after_forward: FSDP frees each block's gathered weights after its forward and gathers them again
            for its backward (true: the least memory); false keeps them from the forward to the backward: half the
            all-gathers, for the whole model's bf16 weights held on every device during a micro-batch.
        log_interval: optimizer steps between TensorBoard points.
        save_interval: optimizer steps between checkpoints (and one at the end).
        keep_last: checkpoints kept in out_dir (older ones are deleted).
        check_disk: stop at the start when out_dir cannot hold the checkpoints the run will keep and its export
            (false: a warning; each checkpoint is still checked before it is written).
    """
    seq_len: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 8
    max_tokens: Optional[int] = None
    max_steps: Optional[int] = None
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    activation_checkpointing: Union[bool, int, Literal["auto"]] = False
    compile: bool = False
    reshard_after_forward: bool = True
    log_interval: int = 10
    save_interval: Optional[int] = 1000
    keep_last: int = 2
    check_disk: bool = True


@dataclass
class EvalArgs:
    """Validation and the closing sample.

    Args:
        interval: optimizer steps between validation runs (and one at the end).
        max_batches: validation micro-batches per device.
        sample_prompt: the prompt of the continuation printed at the end (empty: no sample).
        sample_tokens: length of that continuation in tokens (0: no sample).
    """
    interval: int = 500
    max_batches: int = 20
    sample_prompt: str = "The"
    sample_tokens: int = 100


def main(
    *,
    model: Optional[str] = None,
    model_config: Optional[dict[str, Any]] = None,
    init_from: Optional[Path] = None,
    tokenizer_dir: Optional[Path] = None,
    out_dir: Path = Path("out/tiny"),
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    resume: Union[bool, Literal["auto"], Path] = False,
    overwrite: bool = False,
    devices: int = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto",
    context_parallel: int = 1,
    precision: Optional[str] = None,
    peak_flops: Optional[float] = None,
    export_dtype: Literal["bfloat16", "float32"] = "float32",
    seed: int = 1337,
    dry_run: bool = False,
) -> None:
    """Train a SpikingBrain model.

    Args:
        model: preset name (see model.PRESETS); with init_from, the checkpoint's config is used and must agree.
        model_config: overrides of Config fields, e.g. {n_layer: 4, spike_k: 3.0} (unknown keys are an error). On
            the command line `--model_config.spike_k 3` or `--model_config '{...}'` merge into the config file's.
        init_from: a checkpoint directory (convert.py's, or a run's final/) whose weights start the run (CPT, SFT).
        tokenizer_dir: tokenizer directory; default: init_from's, else assets/tokenizer.
        out_dir: checkpoints, logs and the final export go here.
        resume: True or "auto": the newest checkpoint in out_dir ("auto": start fresh if none); or a checkpoint path.
        overwrite: start fresh in an out_dir that holds another run, deleting its step-*, final/ and logs/ first
            (without it, or resume, such an out_dir is an error).
        devices: devices per node.
        num_nodes: nodes (the same command runs on each).
        accelerator: "cpu", "cuda" or "auto".
        strategy: "auto" = fsdp for more than one device; "ddp"; "fsdp" (FSDP2, per-block sharding, CPU gloo too).
        context_parallel: devices that split each row between them (every layout, sinks, packed documents).
        precision: "bf16-mixed" (bf16 compute, fp32 weights and optimizer), "bf16-true", "32-true"; default:
            bf16-mixed on GPUs and on CPUs with bf16 matrix units (AMX, AVX512-BF16), else 32-true (AVX2 CPUs
            emulate bf16 matmuls about 10x slower than fp32).
        peak_flops: device peak FLOP/s for MFU when the device is not in kernels.PEAK_FLOPS.
        export_dtype: dtype of final/model.safetensors.
        seed: seed of the initialization and of the order of the training rows.
        dry_run: print parameters, FLOPs/token and estimated memory per device for devices x num_nodes; no allocation.
    """
    init_from, out_dir = Path(init_from) if init_from else None, Path(out_dir)
    # a dry run plans from the preset alone, before any checkpoint exists
    config = resolve_config(model, model_config, None if dry_run and model else init_from)
    precision = precision or ("bf16-mixed" if dry_run else default_precision(accelerator))   # plans are for GPUs
    world_size = devices * num_nodes
    strategy = ("fsdp" if world_size > 1 else "single") if strategy == "auto" else strategy
    check_sizes(train, eval, config)
    cp = context_parallel
    check_context_parallel(cp, world_size, train)
    train, batch_note = fit_micro_batch(train, world_size, cp)
    if dry_run:
        print("\n".join(filter(None, [batch_note, plan(config, train, world_size, strategy, precision, cp)])))
        return

    check_writable(out_dir)   # before Fabric starts: its logger would fail later with a less useful message
    check_out_dir(out_dir, resume, overwrite)   # before Fabric starts: a refused run spawns no processes
    fabric = launch(accelerator, devices, num_nodes, precision, strategy, out_dir, train.reshard_after_forward)
    fabric.seed_everything(seed)
    cp_group = context_group(fabric, cp)
    if batch_note:
        fabric.print(batch_note)
    clean_out_dir(fabric, out_dir, overwrite)

    tokenizer_dir = tokenizer_dir or (init_from if init_from and os.path.isfile(init_from / "tokenizer.json")
                                      else Path("assets/tokenizer"))
    tokenizer, train_data, val_data = load_data(fabric, config, data, train.seq_len, tokenizer_dir)
    net, optimizer, flops_per_token = build(fabric, config, train, init_from, strategy, precision, cp)
    # everything a checkpoint restores; the data position is iter_num (the order of rows is a function of it)
    state = {"model": net, "optimizer": optimizer, "iter_num": 0, "step": 0, "rng": None,
             "data": train_data.fingerprint}
    if resume:
        resume_state(fabric, state, resume, out_dir)
    ckpt_bytes = checkpoint_bytes(net, optimizer)
    export_bytes = sum(p.numel() for p in net.parameters()) * getattr(torch, export_dtype).itemsize
    check_disk(fabric, out_dir, disk_plan(state["step"], train, out_dir, ckpt_bytes, export_bytes),
               f"this run's checkpoints ({ckpt_bytes / 1e9:.2f} GB each, train.keep_last={train.keep_last}) and its "
               f"final export", warn=not train.check_disk,
               hint=" (train.check_disk=false: a warning here instead)")

    fit(fabric, state, config, train_data, val_data, train, eval, out_dir, flops_per_token,
        peak_flops or kernels.peak_flops(fabric.device), seed, cp_group)

    final = out_dir / "final"
    export(fabric, net, config, final, tokenizer_dir, getattr(torch, export_dtype))
    if fabric.global_rank == 0 and eval.sample_prompt and eval.sample_tokens:
        print_sample(fabric, final, tokenizer, eval.sample_prompt, eval.sample_tokens)


# ----------------------------------------------------------------------------- setup

def check_sizes(train, eval, config):
    """Batch sizes, row length and intervals must be positive, a number of checkpointed blocks one the model has;
    an error names the one that is not."""
    for k in ("seq_len", "micro_batch_size", "global_batch_size"):
        if getattr(train, k) <= 0:
            raise ValueError(f"train.{k}={getattr(train, k)} must be >= 1")
    if eval.interval <= 0 or train.log_interval <= 0:
        raise ValueError("eval.interval and train.log_interval must be >= 1")
    ac = train.activation_checkpointing
    if not isinstance(ac, bool) and ac != "auto" and not 0 <= ac <= config.n_layer:
        raise ValueError(f"train.activation_checkpointing={ac}: a number of blocks must lie in 0..{config.n_layer} "
                         f"(or use true, false or auto)")


def fit_micro_batch(train, world_size, cp=1):
    """train with a micro_batch_size that divides each data-parallel rank's share of global_batch_size (the largest
    that does, at most the one asked for), and a line saying so when it was lowered (None otherwise). The
    context_parallel (cp) devices of one data-parallel rank share its rows."""
    g, m, dp = train.global_batch_size, train.micro_batch_size, world_size // cp
    who = f"{world_size} devices (devices x num_nodes)" if cp == 1 else \
        f"{dp} data-parallel ranks ({world_size} devices / context_parallel {cp})"
    if g % dp:
        raise ValueError(f"train.global_batch_size={g} must be a multiple of the {who}: every one takes the same "
                         f"number of rows")
    rows = g // dp
    fit = max(d for d in range(1, min(m, rows) + 1) if rows % d == 0)
    if fit == m:
        return train, None
    return replace(train, micro_batch_size=fit), (f"train.micro_batch_size {m} -> {fit}: global_batch_size {g} over "
                                                  f"{dp} {'device(s)' if cp == 1 else 'data-parallel rank(s)'} is "
                                                  f"{rows} rows per {'device' if cp == 1 else 'rank'}")


def check_context_parallel(cp, world_size, train):
    """What kernels.py's split sequence cannot run is refused before any process starts, each with its fix."""
    if cp < 1 or world_size % cp:
        raise ValueError(f"context_parallel={cp} must divide the {world_size} devices (devices x num_nodes)")
    if cp == 1:
        return
    if train.seq_len < cp:
        raise ValueError(f"train.seq_len={train.seq_len} is shorter than context_parallel={cp}: every device needs "
                         f"a token of each row")
    if train.compile:   # the split's steps read host integers and call collectives inside the blocks
        raise ValueError("context_parallel does not run compiled blocks: set --train.compile false")


def check_writable(out_dir):
    """Make out_dir and write a file there (os.access misses read-only mounts and answers yes to root)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"out_dir {out_dir} is not writable ({e.strerror or e}): choose another out_dir or "
                              f"fix its permissions") from None


def default_precision(accelerator):
    gpu = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    fast_bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return "bf16-mixed" if gpu or fast_bf16 else "32-true"


def resolve_config(name, overrides, init_from):
    """Preset + overrides; with init_from, the checkpoint's config.yaml, which must agree with a named preset."""
    overrides = dict(overrides or {})
    if init_from is not None:
        if not (Path(init_from) / "config.yaml").is_file():
            raise FileNotFoundError(f"init_from={init_from} has no config.yaml: give a checkpoint directory written by "
                                    f"convert.py (e.g. `python convert.py qwen2.5 ...`) or by a run (out_dir/final)")
        ckpt = convert.load_config(Path(init_from) / "config.yaml")
        config = Config.from_dict({**ckpt.to_dict(), **overrides})
        if name is not None:   # run-time limits and token ids may differ (convert.py takes them from the source)
            diff = convert.differs(config, Config.from_name(name, **overrides))
            if diff:
                raise ValueError(f"{init_from}/config.yaml differs from preset {name!r} in {diff}: "
                                 f"set them in model_config, or drop `model` to take the checkpoint's config")
        return config
    if name is None:
        raise ValueError(f"give a model preset (one of {sorted(PRESETS)}) or init_from a checkpoint directory")
    return Config.from_name(name, **overrides)


def load_weights(model, path, config, sharded=False):
    """Weights of a checkpoint directory (one model.safetensors or shards + index, as convert.py writes) into a
    model, plain or FSDP-sharded. Every mismatch is checked from the file headers before anything is read."""
    files = convert.checked_files(path, config)
    rank0 = not sharded or torch.distributed.get_rank() == 0
    state = convert.read_state(path, files) if rank0 else {}
    if not sharded:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # rank 0 holds the full tensors; every rank receives its shards
    set_model_state_dict(model.module if hasattr(model, "module") else model, state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def launch(accelerator, devices, num_nodes, precision, strategy, out_dir, reshard=True):
    """A launched Fabric: FSDP2 (`parallelize`), DDP or one device; TensorBoard logs in out_dir/logs."""
    import lightning as L
    from lightning.fabric.loggers import TensorBoardLogger
    from lightning.fabric.strategies import ModelParallelStrategy

    if strategy == "fsdp":
        strategy = ModelParallelStrategy(parallelize_fn=partial(parallelize, mixed=precision == "bf16-mixed",
                                                                reshard=reshard),
                                         data_parallel_size=devices * num_nodes, tensor_parallel_size=1)
    fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, precision=precision,
                      strategy="auto" if strategy == "single" else strategy,
                      loggers=TensorBoardLogger(root_dir=out_dir, name="logs"))
    fabric.launch()
    return fabric


def context_group(fabric, cp):
    """This rank's context-parallel group (None for cp=1): the ranks are a (dp, cp) grid, rank = d * cp + c, and the
    cp ranks of one data-parallel index d split its rows' sequence between them (neighbouring ranks: within a node
    when cp divides devices, where the per-layer gathers are fastest).

    The strategies know nothing of it: FSDP2 shards over all the ranks and DDP replicates over them, as without CP,
    and both average the gradient over all dp * cp ranks. A sequence's gradient is the SUM of its cp ranks' (their
    slices' parts of it, kernels.cp_reduce_grads): fit scales the loss by cp, which makes the average over all
    ranks the mean over the dp ranks of the sequences' gradients, one mechanism for both strategies (FSDP's
    set_gradient_divide_factor would do it for FSDP only)."""
    if cp == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(fabric.device.type, (fabric.world_size // cp, cp), mesh_dim_names=("dp", "cp"))
    return mesh.get_group("cp")


def cp_ranks(fabric, group):
    """(data-parallel rank, data-parallel size) of this process: the ranks that read different rows."""
    cp = 1 if group is None else torch.distributed.get_world_size(group)
    return fabric.global_rank // cp, fabric.world_size // cp


def parallelize(model, mesh, mixed=True, reshard=True):
    """FSDP2: shard every block, then the rest (embeddings, sinks, final norm, head); materialize meta weights.

    With mixed precision the sharded weights stay fp32 (optimizer precision) and each block is all-gathered in
    bf16; gradients are reduced in fp32. Block i + 1 is gathered when block i starts its forward, block i - 1 when
    block i starts its backward (explicit prefetch): the packed documents' host syncs inside a block stop the CPU
    from running ahead, so a gather issued only when its block is reached would wait on the compute before it. The
    last block stays gathered from its forward to its backward, which follows at once. At most two blocks are
    gathered at a time, as the memory plan counts; reshard=False keeps every block gathered from its forward to
    its backward (TrainArgs.reshard_after_forward).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else \
        MixedPrecisionPolicy()
    dp = mesh["data_parallel"]
    for i, block in enumerate(model.blocks):   # the last block's backward follows its forward: kept gathered
        fully_shard(block, mesh=dp, mp_policy=mp, reshard_after_forward=reshard and i < len(model.blocks) - 1)
    fully_shard(model, mesh=dp, mp_policy=mp)
    for a, b in zip(model.blocks, model.blocks[1:]):
        a.set_modules_to_forward_prefetch([b])
        b.set_modules_to_backward_prefetch([a])
    if any(p.is_meta for p in model.parameters()):
        cuda = mesh.device_type == "cuda"
        model.to_empty(device=torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu")
        with torch.no_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            if not cuda:   # CPU meshes draw each shard from the local generator: differ per rank, not a copy of rank 0
                warnings.filterwarnings("ignore", "DTensor random operators")
                torch.manual_seed(torch.initial_seed() + mesh.get_rank())
            model.apply(model._init_weights)   # the model's own init, applied to this rank's shards
    return model



def load_data(fabric, config, data, seq_len, tokenizer_dir):
    """The run's tokenizer and the packed rows of both splits; rank 0 first prepares data.path from data.inputs when
    it is not prepared yet."""
    tokenizer = Tokenizer(tokenizer_dir)
    if tokenizer.n_vocab > config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has {tokenizer.n_vocab} tokens but vocab_size="
                         f"{config.vocab_size}: raise model_config.vocab_size or use the model's tokenizer")
    if fabric.global_rank == 0 and not (data.path / "meta.json").is_file() and data.inputs:
        prepare(inputs=data.inputs, out=data.path, tokenizer_dir=tokenizer_dir, val_fraction=data.val_fraction)
    fabric.barrier()
    return tokenizer, *(Packed(data.path, split, seq_len, tokenizer, data.doc_mask) for split in ("train", "val"))


def build(fabric, config, train, init_from, strategy, precision, cp=1):
    """The model set up for the strategy (initialized, or init_from's weights; compiled and checkpointed as train
    asks), its AdamW, and its training FLOPs per token."""
    # FSDP builds on the meta device and materializes only each rank's shards; loaded weights overwrite init anyway
    with fabric.init_module(empty_init=strategy == "fsdp" or init_from is not None):
        model = GPT(config)
    flops = model.flops_per_token(train.seq_len)
    plan_for = memory_plan(config, sum(p.numel() for p in model.parameters()), train, fabric.world_size, strategy,
                           precision, cp)
    n_ckpt = checkpointed_blocks(train.activation_checkpointing, config.n_layer, plan_for, fabric.device)
    if train.activation_checkpointing == "auto":
        fabric.print(f"activation checkpointing (auto): {n_ckpt} of {config.n_layer} blocks, planned "
                     f"{plan_for(n_ckpt)['total'] / 1e9:.1f} GB a device")
    if init_from is not None and strategy != "fsdp":
        load_weights(model, init_from, config)
    if train.compile:   # before checkpointing: the wrapper recomputes the compiled block in the backward pass
        kernels.compile_blocks(model)
    if n_ckpt:
        kernels.checkpoint_blocks(model, n_ckpt)
    model = fabric.setup(model)
    if init_from is not None and strategy == "fsdp":
        load_weights(model, init_from, config, sharded=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "sinks" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "sinks" in n]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=train.weight_decay),
                                   dict(params=no_decay, weight_decay=0.0)],
                                  lr=train.lr, betas=train.betas, fused=fabric.device.type == "cuda")
    return model, fabric.setup_optimizers(optimizer), flops


def resume_state(fabric, state, resume, out_dir):
    """Load a checkpoint into state: the newest in out_dir (resume True or "auto"; "auto" with none: start fresh) or
    the path given. It must have been trained on this run's data; the RNG continues where it stopped."""
    path = latest_checkpoint(out_dir) if resume in (True, "auto") else Path(resume)
    if path is None and resume is True:
        raise FileNotFoundError(f"resume=True but {out_dir} has no complete step-* checkpoint: use resume=auto "
                                f"to start fresh when there is none")
    if path is None:
        return
    t0, data = time.perf_counter(), state["data"]
    load_state(fabric, path, state)
    fabric.print(f"resumed from {path} (step {state['step']}) in {time.perf_counter() - t0:.1f} s")
    if state["data"] != data:
        raise ValueError(f"{path} was trained on other data ({state['data']}); this run has "
                         f"{data}: point data.path at the original data or start fresh")
    set_rng_state(state["rng"])


# ----------------------------------------------------------------------------- the loop

def fit(fabric, state, config, train_data, val_data, train, eval, out_dir, flops_per_token, peak, seed,
        cp_group=None):
    """Micro-batches accumulated into optimizer steps until max_steps; logs, validation and checkpoints between.
    With a cp_group (context_group) its ranks read the same rows, each the loss of its slice of them."""
    from lightning.fabric.strategies import ModelParallelStrategy
    from tqdm import tqdm

    model, optimizer = state["model"], state["optimizer"]
    dp_rank, dp = cp_ranks(fabric, cp_group)
    cp = fabric.world_size // dp
    accum, max_steps = schedule(fabric, state, config, train, len(train_data), dp, cp)
    bar = tqdm(total=max_steps, initial=state["step"], unit="step", disable=fabric.global_rank != 0, dynamic_ncols=True)
    # every token of a step counted once, however many devices computed a part of its row
    metrics = Metrics(fabric, model, accum * train.log_interval, train.global_batch_size * train.seq_len,
                      flops_per_token, peak, state["step"])
    step_loss = 0.0   # the step's micro-batch losses, summed on the device for the finiteness check
    # DDP skips the gradient all-reduce until the last micro-batch of a step. FSDP2 reduce-scatters after every one:
    # skipped, it would keep each device's whole gradient unsharded (fp32) until the step's end, 4 bytes a
    # parameter on every device (the 76B's 304 GB), where reduced its fp32 shards accumulate
    sync_each = isinstance(fabric.strategy, ModelParallelStrategy)
    while state["step"] < max_steps:
        rows = train_rows(len(train_data), state["iter_num"], dp_rank, dp, train.micro_batch_size, seed)
        x, y, doc = train_data.batch(rows, fabric.device)
        x, y, doc = (kernels.cp_slice(t, cp_group) for t in (x, y, doc))
        is_accumulating = (state["iter_num"] + 1) % accum != 0
        log_now = not is_accumulating and (state["step"] + 1) % train.log_interval == 0
        hooks = spike_hooks(model, metrics.sparsity) if log_now and config.spike_k else []
        with fabric.no_backward_sync(model, enabled=is_accumulating and not sync_each):
            _, loss, aux = model(x, y, doc, cp_group=cp_group)
            if cp_group is not None:   # the rows' mean loss, the same on every cp rank
                loss = kernels.cp_loss(loss, (y != -100).sum(), cp_group)
            for h in hooks:   # before backward: checkpointed blocks would run them again in the recompute
                h.remove()
            # times cp: the strategies average gradients over all dp * cp ranks, a row's is the sum over its cp ranks
            # (context_group); loss and aux (kernels.cp_balance) are the row's on every cp rank
            fabric.backward(cp * (loss + config.aux_loss_coef * aux) / accum)
        metrics.loss.update(loss.detach())
        step_loss = step_loss + loss.detach()
        state["iter_num"] += 1
        if is_accumulating:
            continue

        lr = get_lr(state["step"], train.lr, train.min_lr, train.warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # our check below names the step and the checkpoint to go back to; Lightning's error would name neither
        grad_norm = fabric.clip_gradients(model, optimizer, max_norm=train.grad_clip, error_if_nonfinite=False)
        check_finite(fabric, state["step"] + 1, step_loss, grad_norm, out_dir, train.lr)
        step_loss = 0.0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        bar.update()

        if log_now:
            metrics.log(state["step"], lr, grad_norm, bar)
        last = state["step"] == max_steps
        if state["step"] % eval.interval == 0 or last:
            val_loss, val_ppl = validate(fabric, model, val_data, train.micro_batch_size, eval.max_batches, cp_group)
            fabric.log_dict({"val/loss": val_loss, "val/ppl": val_ppl}, step=state["step"])
            if fabric.global_rank == 0:
                bar.write(f"step {state['step']}: val loss {val_loss:.4f}, val ppl {val_ppl:.2f}")
            metrics.restart(state["step"])   # validation time is not training time
        if (train.save_interval and state["step"] % train.save_interval == 0) or last:
            seconds, size = save(fabric, state, config, out_dir, train.keep_last)
            fabric.log_dict({"perf/checkpoint_s": seconds}, step=state["step"])
            if fabric.global_rank == 0:
                gb = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
                bar.write(f"step {state['step']}: checkpoint of {gb} written in {seconds:.1f} s")
            metrics.restart(state["step"])
    bar.close()
    metrics.summary()


def schedule(fabric, state, config, train, n_rows, dp, cp):
    """Micro-batches per optimizer step on each data-parallel rank, and optimizer steps in all (checked against the
    step resumed from); prints the run's one-line summary."""
    accum = train.global_batch_size // (train.micro_batch_size * dp)
    max_steps = total_steps(train)
    if max_steps <= 0:
        raise ValueError("set train.max_steps or train.max_tokens")
    if state["step"] > max_steps:
        raise ValueError(f"the checkpoint resumed is at step {state['step']}, beyond train.max_steps={max_steps}: "
                         f"raise max_steps (or max_tokens) to train it further, or start fresh with overwrite=true")
    tokens_per_step = train.global_batch_size * train.seq_len
    world = f"world size {fabric.world_size}" + (f" ({dp} data-parallel x {cp} context-parallel)" if cp > 1 else "")
    epochs = max_steps * tokens_per_step / (n_rows * train.seq_len)
    fabric.print(f"{config.name}: {sum(p.numel() for p in state['model'].parameters()) / 1e6:.1f}M parameters, "
                 f"{n_rows} training rows of {train.seq_len} tokens, {max_steps} steps of "
                 f"{tokens_per_step} tokens ({epochs:.1f} epochs), {accum} micro-batches per step per device, "
                 f"{world}")
    return accum, max_steps


def total_steps(train):
    return train.max_steps or math.ceil((train.max_tokens or 0) / (train.global_batch_size * train.seq_len))


class Metrics:
    """What fit logs to TensorBoard: the running training loss, tokens/s per device and MFU since the last log, peak
    GPU memory, each MoE layer's largest expert load, spike sparsity; and the median speed at the end."""

    def __init__(self, fabric, model, window, tokens_per_step, flops_per_token, peak, step):
        from torchmetrics.aggregation import RunningMean

        self.fabric, self.peak = fabric, peak
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.loss = RunningMean(window=window, sync_on_compute=True).to(fabric.device)
        self.expert_load, self.sparsity = {}, {}   # filled by forward hooks: the MoE layers', and fit's spike_hooks
        for name, m in named_modules(model):   # MoE layers return the share of tokens per expert
            if isinstance(m, MoE):
                m.register_forward_hook(lambda mod, inp, out, name=name: self.expert_load.__setitem__(name, out[2]))
        self.speeds, self.mems = [], [0.0]   # tokens/s per device and peak GB at each log, for the summary at the end
        self.restart(step)
        if fabric.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def restart(self, step):
        """Time from here on: what ran before (validation, a checkpoint) is not training time."""
        self.t0, self.step0 = time.perf_counter(), step

    def log(self, step, lr, grad_norm, bar):
        """One TensorBoard point at optimizer step `step` (and the progress bar's numbers)."""
        fabric = self.fabric
        loss = self.loss.compute().item()   # synchronizes devices, so the timing below is honest
        dt = time.perf_counter() - self.t0
        tok_s = (step - self.step0) * self.tokens_per_step / dt / fabric.world_size   # per device
        metrics = {"train/loss": loss, "train/ppl": math.exp(min(loss, 20)), "train/lr": lr,
                   "train/grad_norm": float(getattr(grad_norm, "full_tensor", lambda: grad_norm)()),   # FSDP
                   "perf/tokens_per_s_per_device": tok_s, "perf/tokens_seen": step * self.tokens_per_step}
        if self.peak:
            metrics["perf/mfu"] = self.flops_per_token * tok_s / self.peak
        if fabric.device.type == "cuda":
            metrics["perf/max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            self.mems.append(metrics["perf/max_memory_gb"])
            torch.cuda.reset_peak_memory_stats()
        for name, load in self.expert_load.items():   # 1.0 = perfectly balanced; n_expert = all tokens to one expert
            metrics[f"moe/max_load.{name}"] = (load.max() * load.numel()).item()
        if self.sparsity:
            metrics["spike/zero_fraction"] = sum(self.sparsity.values()) / len(self.sparsity)
        fabric.log_dict(metrics, step=step)
        self.speeds.append(tok_s)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        self.restart(step)

    def summary(self):
        if len(self.speeds) < 2:   # the first interval holds start-up and compilation
            return
        tok_s, fpt = float(np.median(self.speeds[1:])), self.flops_per_token
        mfu = f", MFU {fpt * tok_s / self.peak:.1%}" if self.peak else ""
        mem = f", peak memory {max(self.mems):.1f} GB" if self.fabric.device.type == "cuda" else ""
        self.fabric.print(f"median {tok_s:.0f} tokens/s per device{mfu}{mem} ({fpt:.3g} FLOP/token)")


def check_finite(fabric, step, loss, grad_norm, out_dir, lr):
    """Stop before a NaN or inf loss or gradient reaches the weights. One host sync per optimizer step: the local
    loss plus this rank's part of the gradient norm, summed over ranks (a NaN or inf anywhere stays one), so every
    rank stops at the same step."""
    local = getattr(grad_norm, "to_local", lambda: grad_norm)()   # FSDP: a DTensor
    if math.isfinite(fabric.all_reduce(loss + local.float(), reduce_op="sum").item()):
        return
    ckpt = latest_checkpoint(out_dir)
    raise FloatingPointError(
        f"step {step}: the loss ({float(loss):.4g}) or the gradient norm ({float(local):.4g}) is not finite; stopped "
        f"before the optimizer step, nothing of it was saved. The last good checkpoint is kept: "
        f"{ckpt or f'none in {out_dir} (no checkpoint was saved yet)'}. Lower train.lr (now {lr:g}) or raise "
        f"train.warmup_steps, then continue with resume=auto")


def get_lr(step, lr, min_lr, warmup_steps, max_steps):
    """Linear warmup to lr over warmup_steps, then cosine down to min_lr at max_steps."""
    warmup_steps = min(warmup_steps, max_steps // 2)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validate(fabric, model, data, micro_batch_size, max_batches, cp_group=None):
    """Perplexity over the first validation rows; every device runs the same number of batches (FSDP needs it).

    exp of the token-weighted mean loss: the model's chunked loss never builds full logits (128k rows of them
    would not fit), which torchmetrics' Perplexity needs. Under context parallelism each rank adds its slice's
    tokens: the weighted mean over all ranks is the rows' again."""
    from torchmetrics import MeanMetric

    model.eval()
    nll = MeanMetric(sync_on_compute=True).to(fabric.device)
    rank, world = cp_ranks(fabric, cp_group)
    n = max(1, min(max_batches, len(data) // (micro_batch_size * world)))
    for i in range(n):
        rows = [((i * world + rank) * micro_batch_size + j) % len(data) for j in range(micro_batch_size)]
        x, y, doc = data.batch(rows, fabric.device)
        x, y, doc = (kernels.cp_slice(t, cp_group) for t in (x, y, doc))
        _, loss, _ = model(x, y, doc, cp_group=cp_group)
        nll.update(loss.float(), weight=(y != -100).sum())
    reshard(model)
    model.train()
    loss = nll.compute().item()
    return loss, math.exp(loss)


def reshard(model):
    """Shard again what a forward without backward left gathered: under reshard_after_forward=False FSDP keeps the
    blocks gathered for a backward that validation never runs, and a checkpoint needs the shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def spike_hooks(model, out):
    """Record the fraction of zero spike counts at the input of every spiking projection (one forward; stacked
    experts over all their calls)."""
    seen = {}

    def hook(mod, inp, name):
        if inp[0].numel():   # an MoE expert may get no token
            zero = spike_quant(inp[0].detach(), mod.spike_k)[0] == 0
            z, n = seen.get(name, (0, 0))
            seen[name] = z + int(zero.sum()), n + zero.numel()
            out[name] = seen[name][0] / seen[name][1]
    return [m.register_forward_pre_hook(partial(hook, name=n)) for n, m in named_modules(model)
            if isinstance(m, (Linear, ExpertLinear)) and m.spike_k is not None]


def named_modules(model):
    """Module names as in the checkpoint, whatever Fabric and activation checkpointing wrapped around them."""
    model = model.module if hasattr(model, "module") else model
    return ((n.replace("_checkpoint_wrapped_module.", ""), m) for n, m in model.named_modules())


# ----------------------------------------------------------------------------- checkpoints

COMPLETE = "complete"   # the file a checkpoint gets last, once every rank's part of it is on disk


def save(fabric, state, config, out_dir, keep_last):
    """out_dir/step-XXXXXXX/{state, config.yaml, complete}: written under a temp name, renamed when complete. Older
    checkpoints are deleted oldest first, each renamed away first: a kill never leaves half of one as step-*.
    Returns the seconds it took (all ranks' writes) and its bytes (rank 0's count, 0 on the others)."""
    t0, size = time.perf_counter(), 0
    name = f"step-{state['step']:07d}"
    check_disk(fabric, out_dir, checkpoint_bytes(state["model"], state["optimizer"]), f"the checkpoint of {name}")
    tmp, final = out_dir / f".tmp-{name}", out_dir / name
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        convert.save_config(config, tmp / "config.yaml")
    fabric.barrier()
    state["rng"] = get_rng_state()
    fabric.save(tmp / "state", state)
    fabric.barrier()
    if fabric.global_rank == 0:
        (tmp / COMPLETE).touch()
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        if final.exists():
            remove_dir(final)
        os.replace(tmp, final)
        # higher steps can only be there when resuming from an older path: that history is not this run's to prune
        older = [p for p in sorted(out_dir.glob("step-*")) if p.name < name]
        keep = [p for p in older if is_complete(p)][-(keep_last - 1):] if keep_last > 1 else []
        for old in older if keep_last > 0 else []:
            if old not in keep:
                remove_dir(old)
    fabric.barrier()
    return time.perf_counter() - t0, size


def checkpoint_bytes(model, optimizer):
    """A checkpoint's size, all ranks together: the weights and the optimizer's state (before the first step has made
    AdamW's two moments, two more copies of the weights). A DTensor's numel and size are the whole tensor's."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim())
    return weights + (moments or 2 * weights)


def disk_plan(step, train, out_dir, ckpt_bytes, export_bytes):
    """Bytes a run at `step` adds to out_dir at its fullest: the checkpoints it will write (ckpt_bytes each), of which
    keep_last stay (one more while the next one is written; the run's checkpoints already there count among them),
    and the export."""
    steps, every, keep = total_steps(train), train.save_interval, train.keep_last
    n_new = 0 if step >= steps else (steps // every - step // every + bool(steps % every) if every else 1)
    have = sum(is_complete(p) for p in Path(out_dir).glob("step-*"))
    add = 0 if not n_new else n_new if keep <= 0 else max(1, min(have + n_new - 1, keep) + 1 - have)
    return add * ckpt_bytes + export_bytes


def check_disk(fabric, out_dir, need, what, warn=False, hint=""):
    """Refuse (or warn), on every rank alike, to start writing what the disk cannot hold: a checkpoint cut short by a
    full disk is lost work, and torch.distributed.checkpoint's error then ("unexpected pos") does not say why."""
    free = fabric.broadcast(shutil.disk_usage(out_dir).free if fabric.global_rank == 0 else 0, src=0)
    if free < need:
        msg = (f"{what}: {need / 1e9:.2f} GB needed in {out_dir}, {free / 1e9:.2f} GB free. Free disk space, lower "
               f"train.keep_last, or choose another out_dir")
        if not warn:
            raise OSError(msg + hint)
        warnings.warn(msg, stacklevel=2)


def latest_checkpoint(out_dir):
    """The newest complete step-* checkpoint in out_dir, or None."""
    done = [p for p in sorted(Path(out_dir).glob("step-*")) if is_complete(p)]
    return done[-1] if done else None


def is_complete(path):
    """save() wrote it to the end. Checkpoints from before the marker count when their state file, or a sharded
    state's .metadata, is there."""
    return (path / COMPLETE).is_file() or (path / "state").is_file() or (path / "state" / ".metadata").is_file()


def remove_dir(path):
    """Rename, then delete: a kill midway leaves a .trash-* directory (cleared at the next start), not half of path."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash)


def check_out_dir(out_dir, resume, overwrite):
    """A fresh run must not start among another run's checkpoints: pruning by step number would delete the new ones,
    final/ would be replaced, and resume=auto would later pick the old run's newest step."""
    if resume and overwrite:
        raise ValueError(f"resume={resume} continues the run in {out_dir} and overwrite=true deletes it: choose one")
    old = [p.name for p in sorted(Path(out_dir).glob("step-*"))][-2:] + ["final"] * (Path(out_dir) / "final").exists()
    if old and not resume and not overwrite:
        raise FileExistsError(f"out_dir {out_dir} holds another run ({', '.join(old)}): continue it with resume=auto "
                              f"(--resume auto), delete it and start fresh with overwrite=true (--overwrite true), "
                              f"or choose another out_dir")
    if resume in (True, "auto") and old == ["final"] and not overwrite:   # its checkpoints deleted, final/ kept
        raise FileExistsError(f"out_dir {out_dir} holds a finished run (final/) and no step-* checkpoint to resume: "
                              f"resume={resume} would train from the start and replace its final/. Start fresh there "
                              f"with overwrite=true (--overwrite true), or choose another out_dir")


def clean_out_dir(fabric, out_dir, overwrite):
    """Rank 0 deletes what killed runs leave (temp checkpoints and exports, half-deleted checkpoints) and, with
    overwrite, the previous run; the other ranks wait."""
    if fabric.global_rank == 0 and out_dir.is_dir():
        for p in [p for pattern in (".tmp-step-*", ".final.tmp-*", ".trash-*") for p in out_dir.glob(pattern)]:
            shutil.rmtree(p)
        for p in [p for pattern in ("step-*", "final", "logs") for p in out_dir.glob(pattern)] if overwrite else []:
            remove_dir(p)
    fabric.barrier()


def load_state(fabric, path, state):
    """fabric.load(path/state) unpickling only tensors and plain values, so that a checkpoint cannot run code.

    Every torch.load inside is forced to weights_only (Lightning before 2.6 does not ask for it, and
    torch.distributed.checkpoint reads non-tensor items with weights_only=False); the .metadata of a sharded
    checkpoint, a plain pickle, is read first with only torch.distributed.checkpoint's own classes allowed.
    """
    file, env = path / "state", os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        if (file / ".metadata").is_file():
            with open(file / ".metadata", "rb") as f:
                MetadataUnpickler(f).load()
        fabric.load(file, state)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{file} holds objects other than tensors and plain values, which can run code "
                                     f"when loaded: refused. Resume only from checkpoints that train.py wrote") from e
    finally:
        if env is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = env


class MetadataUnpickler(pickle.Unpickler):
    """A sharded checkpoint's .metadata (torch.distributed.checkpoint unpickles it without restriction): only its
    record classes, torch.Size, dtypes, layouts and paths may appear."""

    def find_class(self, module, name):
        import pathlib

        from torch.distributed.checkpoint import filesystem, metadata

        modules = {"torch": torch, "torch.serialization": torch.serialization, "pathlib": pathlib,
                   "pathlib._local": pathlib, metadata.__name__: metadata, filesystem.__name__: filesystem}
        obj = getattr(modules.get(module), name, None)
        if (isinstance(obj, type) and obj.__module__ == metadata.__name__) or isinstance(obj, torch.dtype) or any(
                obj is o for o in (torch.Size, filesystem._StorageInfo, torch.serialization._get_layout,
                                   pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                                   pathlib.PureWindowsPath)):
            return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata")


def get_rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng):
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])


def export(fabric, model, config, out, tokenizer_dir, dtype):
    """One consolidated safetensors file + config.yaml + tokenizer (convert.save_checkpoint), from any strategy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = model.module if hasattr(model, "module") else model
    if torch.distributed.is_initialized():   # all ranks gather; rank 0 receives the full tensors on CPU
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = module.state_dict()
    if fabric.global_rank == 0:
        convert.save_checkpoint({k: v.to(dtype) for k, v in state.items()}, config, out, tokenizer_dir)
        fabric.print(f"exported {out}")
    fabric.barrier()


def print_sample(fabric, final, tokenizer, prompt, n):
    """A short continuation by the export (the run's own check that it learned something) and the command that
    continues it."""
    model, _ = convert.load_checkpoint(final)
    ids = generate(model, torch.tensor([tokenizer.encode(prompt)]), n, temperature=0.8, top_k=50,
                   eos_id=tokenizer.eos_id, generator=torch.Generator().manual_seed(0))
    fabric.print(f"\n--- sample ---\n{prompt}{tokenizer.decode(ids)}\n--- continue it with:\n"
                 f"python generate.py --ckpt {final} --prompt {json.dumps(prompt)}")


# ----------------------------------------------------------------------------- dry run: the memory plan

def activation_bytes(c, seq_len):
    """Saved activations per token of each layer, bf16 (2 bytes), from the tensors autograd keeps in model.py.

    Norms keep an fp32 copy and the normed output (3D in bf16 units); projections keep their input; a linear-attention
    branch keeps relu(q), k, v, the fp32 log-gate repeated to all heads and its g_norm input (~9Q + 3KV); a softmax
    branch keeps RoPE'd q, k, v, the output and the fp32 RoPE halves (~5Q + 4KV); the SwiGLU keeps gate, up, silu and
    their product (4I) per expert a token visits. An estimate (+-30%), checked against measured GPU memory by bench.
    """
    D, Q, KV, I = c.n_embd, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.intermediate_size
    per_layer = []
    for i in range(c.n_layer):
        kinds = c.mixers(i)
        mix = sum(9 * Q + 3 * KV if k in ("gla", "la") else 5 * Q + 4 * KV for k in kinds) + 3 * Q * (len(kinds) - 1)
        ffn = 4 * I * (c.top_k + c.n_shared_expert) + c.n_expert * 2 if i in c.moe_layers else 4 * I
        per_layer.append(2 * (6 * D + 2 * D + mix + Q + ffn))
    return per_layer


def estimate_memory(config, n_params, micro_batch_size, seq_len, world_size, strategy, precision, checkpointing,
                    cp=1, reshard=True):
    """Bytes per device by item: weights, grads, optimizer, gathered (FSDP all-gather), activations, logits.
    checkpointing: True (every block), False, or the number of blocks checkpointed (the first ones). With context
    parallelism (cp) a device holds the activations of its slice of each row, -(-seq_len // cp) tokens, and in each
    full-attention layer the keys and values gathered from the devices before it (the last device's share).
    FSDP's gradients stay sharded between the micro-batches of a step: fit reduce-scatters after each. reshard:
    TrainArgs.reshard_after_forward (False: every block's bf16 weights stay gathered through a micro-batch)."""
    row, seq_len = seq_len, -(-seq_len // cp)
    c, tokens = config, micro_batch_size * (seq_len + config.n_sink)
    n_ckpt = c.n_layer if checkpointing is True else int(checkpointing)
    w, g, o = {"bf16-mixed": (4, 4, 8), "bf16-true": (2, 2, 4), "32-true": (4, 4, 8)}.get(precision, (4, 4, 8))
    shard = world_size if strategy == "fsdp" else 1
    emb = 2 * c.vocab_size * c.n_embd
    block = (n_params - emb - c.n_sink * c.n_embd) / c.n_layer
    per_layer = activation_bytes(c, seq_len)   # a checkpointed block keeps its input; one at a time recomputes
    acts = tokens * (sum(per_layer[n_ckpt:]) + 2 * c.n_embd * n_ckpt + max(per_layer[:n_ckpt], default=0))
    fa = [int("fa" in c.mixers(i)) for i in range(c.n_layer)]
    fa_held = sum(fa[n_ckpt:]) + max(fa[:n_ckpt], default=0)   # full-attention layers holding gathered keys at once
    acts += micro_batch_size * (row - seq_len) * 4 * c.n_kv_head * c.head_dim * fa_held
    mem = {"weights": w * n_params / shard, "grads": g * n_params / shard, "optimizer": o * n_params / shard,
           # FSDP holds two blocks' full bf16 weights (current + prefetched) and the embeddings + head while they run
           "gathered": (2 * 2 * block + 2 * emb if reshard else 2 * n_params) * (shard > 1),
           "activations": acts,
           # the loss, 8192 rows at a time: fp32 logits and bf16 softmax of a chunk; the head's gradient (fp32
           # while it accumulates, then in the weights' dtype) and the input's, made in the forward pass
           "logits": min(micro_batch_size * seq_len, 8192) * c.vocab_size * 6 + c.vocab_size * c.n_embd * (4 + w)
                     + tokens * c.n_embd * 2}
    if precision == "bf16-mixed" and strategy != "fsdp":
        mem["gathered"] = 2 * n_params   # autocast keeps a bf16 copy of every weight during the forward
    mem["total"] = sum(mem.values())
    return mem


# the share of a GPU's memory that activation_checkpointing=auto fills: the plan is an estimate (activations +-30%),
# and the allocator's fragmentation, NCCL's buffers and compiled kernels' workspaces need room beside it
AUTO_MEMORY_SHARE = 0.75


def memory_plan(config, n_params, train, world_size, strategy, precision, cp=1):
    """plan_for(checkpointing) -> estimate_memory's dict for this run, checkpointing as estimate_memory takes it."""
    return partial(estimate_memory, config, n_params, train.micro_batch_size, train.seq_len, world_size, strategy,
                   precision, cp=cp, reshard=train.reshard_after_forward)


def fewest_checkpointed(n_layer, plan_for, budget):
    """The fewest blocks (the first ones) to checkpoint for plan_for(n)["total"] to fit in budget bytes; None if no
    number does."""
    return next((n for n in range(n_layer + 1) if plan_for(n)["total"] <= budget), None)


def checkpointed_blocks(ac, n_layer, plan_for, device):
    """How many blocks (the first ones) TrainArgs.activation_checkpointing `ac` checkpoints: all for True, none for
    False, N for N; auto: the fewest whose plan (plan_for(n) -> estimate_memory's dict) fits in AUTO_MEMORY_SHARE of
    the device's memory (all of them on a CPU, or when none fits)."""
    if ac != "auto":
        return n_layer if ac is True else int(ac)
    if device.type != "cuda":
        return n_layer
    budget = AUTO_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory
    n = fewest_checkpointed(n_layer, plan_for, budget)
    return n_layer if n is None else n


def plan(config, train, world_size, strategy, precision, cp=1):
    with torch.device("meta"):
        model = GPT(config)
    n, active = model.num_params(), model.num_params(active_only=True)
    fpt = model.flops_per_token(train.seq_len)
    lines = [f"{config.name}: {n / 1e9:.3f}B parameters ({active / 1e9:.3f}B active per token), "
             f"{fpt / 1e9:.1f} GFLOP per token for training at seq_len {train.seq_len} (forward + backward)",
             f"memory per device: {strategy} over {world_size} device(s), {precision}, micro batch "
             f"{train.micro_batch_size} x {train.seq_len}"
             + (f", each row split over {cp} devices (context_parallel)" if cp > 1 else "") + "   (GB)",
             f"  {'':<13}{'no ckpt':>9}{'ckpt':>9}"]
    plan_for = memory_plan(config, n, train, world_size, strategy, precision, cp)
    m0, m1 = plan_for(False), plan_for(True)
    for k in m0:
        lines.append(f"  {k:<13}{m0[k] / 1e9:>9.1f}{m1[k] / 1e9:>9.1f}")
    L = config.n_layer
    fits = {gpu: fewest_checkpointed(L, plan_for, AUTO_MEMORY_SHARE * gib * 2 ** 30)
            for gpu, gib in (("an H100 (80 GB)", 80), ("an H200 (141 GB)", 141))}
    lines.append("activation_checkpointing auto checkpoints: " + ", ".join(
        f"{i} of {L} blocks on {gpu}" if i is not None else f"all {L} on {gpu}, over {AUTO_MEMORY_SHARE:.0%} "
        f"of it even so" for gpu, i in fits.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def cli_args(argv):
    """The shell's forms of two options that jsonargparse takes as one YAML value each:
    `--inputs a.txt b.jsonl corpus/` (every value up to the next option) -> `--inputs '["a.txt", ...]'`, and
    `--model_config '{n_layer: 2}'` -> `--model_config.n_layer 2`, which merges into the config file's model_config
    (as dotted overrides do) instead of replacing it."""
    import yaml

    def load(s):
        try:
            return yaml.safe_load(s)
        except yaml.YAMLError:
            return s

    out, i = [], 0
    while i < len(argv):
        key, eq, value = argv[i].partition("=")
        if key in ("--inputs", "--data.inputs", "--model_config"):
            j = i + 1   # the option's values: after "=", or every argument up to the next option
            while not eq and j < len(argv) and not argv[j].startswith("--"):
                j += 1
            values = [value] if eq else argv[i + 1:j]
            one = load(values[0]) if len(values) == 1 else ""
            if key == "--model_config" and isinstance(one, dict):
                out += [a for k, v in one.items() for a in (f"--model_config.{k}", json.dumps(v, default=str))]
            elif key != "--model_config" and values and not (one is None or isinstance(one, list)):
                out += [key, json.dumps(values)]
            else:   # already a list, null, or missing: as given (jsonargparse takes it or says what is wrong)
                out += argv[i:j]
            i = j
        else:
            out.append(argv[i])
            i += 1
    return out


COMMANDS_HELP = """other commands (each has its own --help):
  train.py prepare --inputs PATHS --out DIR [--tokenizer_dir DIR]
        text files, .jsonl and directories -> the token shards that --data.path reads
  train.py tokenizer --out DIR
        rebuild the demo tokenizer (assets/tokenizer)"""

if __name__ == "__main__":
    import argparse

    from jsonargparse import CLI, DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Keeps the lines of COMMANDS_HELP as written."""

    commands = {"prepare": prepare, "tokenizer": build_tokenizer}
    command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in commands else None
    try:
        if command:
            CLI(commands[command], args=cli_args(sys.argv[2:]), prog=f"train.py {command}")
        else:
            CLI(main, args=cli_args(sys.argv[1:]), epilog=COMMANDS_HELP, formatter_class=HelpFormatter)
    except (ValueError, OSError, FloatingPointError, pickle.UnpicklingError) as e:   # the message says what, and the fix
        sys.exit(f"error: {e}")   # as convert.py, generate.py and eval.py: one line, exit status 1

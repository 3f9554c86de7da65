"""Train SpikingBrain with Lightning Fabric: the CPU demo, continual pre-training (CPT) from a converted Qwen2.5
and supervised fine-tuning (SFT). The loop is written out in `fit`; every flag is a parameter of `main`.

    python train.py --config configs/tiny.yaml                     # the demo: a tiny SpikingBrain on Python's docs, CPU
    python train.py --config configs/tiny.yaml --resume auto       # continue from the newest checkpoint in out_dir
    python train.py --config configs/tiny.yaml --devices 2 --accelerator cpu --strategy fsdp   # FSDP2, 2 processes
    python train.py --config configs/cpt-7b-8k.yaml --devices 8    # CPT stage 1 on one 8-GPU node (FSDP2)
    python train.py --config configs/cpt-76b-8k.yaml --devices 8 --num_nodes 8 --dry_run true  # memory plan only
    python train.py prepare --inputs corpus/ chats.jsonl --out data/mine --tokenizer_dir DIR  # -> token shards
    python train.py tokenizer --out assets/tokenizer               # rebuild the demo tokenizer (deterministic, ~5 s)
    python train.py --config configs/tiny.yaml --print_config      # every option with its value

Multi-node: run the same command on every node with --num_nodes N; Fabric reads the rank from torchrun or SLURM.
A run writes out_dir/step-XXXXXXX/ (resumable, sharded under FSDP), out_dir/logs/ (TensorBoard) and out_dir/final/
(one consolidated model.safetensors + config.yaml + tokenizer: what generate.py and spiking.py load).

Data: documents end with <|endoftext|> and are packed back to back into rows of seq_len tokens. Document ids go
with every row, so positions restart, softmax attention stays inside a document and the GLA state resets at each
document start; no target crosses a document boundary. SFT data (chat `messages`) is ChatML with a loss only on
what the assistant wrote.
"""
import glob
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

from model import GPT, MoE, PRESETS, Config, Linear, spike_quant
from tokenizer import CHAT_SPECIALS, QWEN_PAT, Tokenizer
from tokenizer import save as save_tokenizer


@dataclass
class DataArgs:
    """Training data.

    Args:
        path: a directory written by `train.py prepare` (token shards, document index, meta.json).
        inputs: if `path` is not prepared yet, prepare it from these files, directories or 'pydoc' first.
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
        activation_checkpointing: recompute each block in backward: memory per layer = its input only.
        compile: torch.compile each block.
        log_interval: optimizer steps between TensorBoard points.
        save_interval: optimizer steps between checkpoints (and one at the end).
        keep_last: checkpoints kept in out_dir (older ones are deleted).
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
    activation_checkpointing: bool = False
    compile: bool = False
    log_interval: int = 10
    save_interval: Optional[int] = 1000
    keep_last: int = 2


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
        precision: "bf16-mixed" (bf16 compute, fp32 weights and optimizer), "bf16-true", "32-true"; default:
            bf16-mixed on GPUs and on CPUs with bf16 matrix units (AMX, AVX512-BF16), else 32-true (AVX2 CPUs
            emulate bf16 matmuls about 10x slower than fp32).
        peak_flops: device peak FLOP/s for MFU when the device is not in PEAK_FLOPS.
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
    for k in ("seq_len", "micro_batch_size", "global_batch_size"):
        if getattr(train, k) <= 0:
            raise ValueError(f"train.{k}={getattr(train, k)} must be >= 1")
    if eval.interval <= 0 or train.log_interval <= 0:
        raise ValueError("eval.interval and train.log_interval must be >= 1")
    train, batch_note = fit_micro_batch(train, world_size)
    if dry_run:
        print("\n".join(filter(None, [batch_note, plan(config, train, world_size, strategy, precision)])))
        return

    check_writable(out_dir)   # before Fabric starts: its logger would fail later with a less useful message
    check_out_dir(out_dir, resume, overwrite)   # before Fabric starts: a refused run spawns no processes
    import lightning as L
    from lightning.fabric.loggers import TensorBoardLogger
    from lightning.fabric.strategies import ModelParallelStrategy

    if strategy == "fsdp":
        fsdp = ModelParallelStrategy(parallelize_fn=partial(parallelize, mixed=precision == "bf16-mixed"),
                                     data_parallel_size=world_size, tensor_parallel_size=1)
    fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, precision=precision,
                      strategy=fsdp if strategy == "fsdp" else "auto" if strategy == "single" else strategy,
                      loggers=TensorBoardLogger(root_dir=out_dir, name="logs"))
    fabric.launch()
    fabric.seed_everything(seed)
    if batch_note:
        fabric.print(batch_note)
    clean_out_dir(fabric, out_dir, overwrite)

    tokenizer_dir = tokenizer_dir or (init_from if init_from and os.path.isfile(init_from / "tokenizer.json")
                                      else Path("assets/tokenizer"))
    tokenizer = Tokenizer(tokenizer_dir)
    if tokenizer.n_vocab > config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has {tokenizer.n_vocab} tokens but vocab_size="
                         f"{config.vocab_size}: raise model_config.vocab_size or use the model's tokenizer")
    if fabric.global_rank == 0 and not (data.path / "meta.json").is_file() and data.inputs:
        prepare(inputs=data.inputs, out=data.path, tokenizer_dir=tokenizer_dir, val_fraction=data.val_fraction)
    fabric.barrier()
    train_data = Packed(data.path, "train", train.seq_len, tokenizer, data.doc_mask)
    val_data = Packed(data.path, "val", train.seq_len, tokenizer, data.doc_mask)

    # FSDP builds on the meta device and materializes only each rank's shards; loaded weights overwrite init anyway
    with fabric.init_module(empty_init=strategy == "fsdp" or init_from is not None):
        net = GPT(config)
    flops_per_token = net.flops_per_token(train.seq_len)
    if init_from is not None and strategy != "fsdp":
        load_weights(net, init_from, config)
    if train.compile:   # before checkpointing: the wrapper recomputes the compiled block in the backward pass
        from generate import compile_blocks
        compile_blocks(net)
    if train.activation_checkpointing:
        checkpoint_blocks(net)
    net = fabric.setup(net)
    if init_from is not None and strategy == "fsdp":
        load_weights(net, init_from, config, sharded=True)
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2 and "sinks" not in n]
    no_decay = [p for n, p in net.named_parameters() if p.dim() < 2 or "sinks" in n]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=train.weight_decay),
                                   dict(params=no_decay, weight_decay=0.0)],
                                  lr=train.lr, betas=train.betas, fused=fabric.device.type == "cuda")
    optimizer = fabric.setup_optimizers(optimizer)

    # everything a checkpoint restores; the data position is iter_num (the order of rows is a function of it)
    state = {"model": net, "optimizer": optimizer, "iter_num": 0, "step": 0, "rng": None,
             "data": train_data.fingerprint}
    if resume:
        path = latest_checkpoint(out_dir) if resume in (True, "auto") else Path(resume)
        if path is None and resume is True:
            raise FileNotFoundError(f"resume=True but {out_dir} has no complete step-* checkpoint: use resume=auto "
                                    f"to start fresh when there is none")
        if path is not None:
            fabric.print(f"resuming from {path}")
            load_state(fabric, path, state)
            if state["data"] != train_data.fingerprint:
                raise ValueError(f"{path} was trained on other data ({state['data']}); this run has "
                                 f"{train_data.fingerprint}: point data.path at the original data or start fresh")
            set_rng_state(state["rng"])

    fit(fabric, state, config, train_data, val_data, train, eval, out_dir, flops_per_token,
        peak_flops or PEAK_FLOPS.get(device_name(fabric.device)), seed)

    final = out_dir / "final"
    export(fabric, net, config, final, tokenizer_dir, getattr(torch, export_dtype))
    if fabric.global_rank == 0 and eval.sample_prompt and eval.sample_tokens:
        from convert import load_checkpoint
        m, _ = load_checkpoint(final)
        text = sample(m, tokenizer, eval.sample_prompt, eval.sample_tokens)
        fabric.print(f"\n--- sample ---\n{eval.sample_prompt}{text}\n--- continue it with:\n"
                     f"python generate.py --ckpt {final} --prompt {json.dumps(eval.sample_prompt)}")


def fit(fabric, state, config, train_data, val_data, train, eval, out_dir, flops_per_token, peak, seed):
    from torchmetrics.aggregation import RunningMean
    from tqdm import tqdm

    model, optimizer = state["model"], state["optimizer"]
    world = fabric.world_size
    accum = train.global_batch_size // (train.micro_batch_size * world)
    max_steps = train.max_steps or math.ceil((train.max_tokens or 0) / (train.global_batch_size * train.seq_len))
    if max_steps <= 0:
        raise ValueError("set train.max_steps or train.max_tokens")
    if state["step"] > max_steps:
        raise ValueError(f"the checkpoint resumed is at step {state['step']}, beyond train.max_steps={max_steps}: "
                         f"raise max_steps (or max_tokens) to train it further, or start fresh with overwrite=true")
    tokens_per_step = train.global_batch_size * train.seq_len
    epochs = max_steps * tokens_per_step / (len(train_data) * train.seq_len)
    fabric.print(f"{config.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                 f"{len(train_data)} training rows of {train.seq_len} tokens, {max_steps} steps of "
                 f"{tokens_per_step} tokens ({epochs:.1f} epochs), {accum} micro-batches per step per device, "
                 f"world size {world}")
    loss_avg = RunningMean(window=accum * train.log_interval, sync_on_compute=True).to(fabric.device)
    expert_load, sparsity = {}, {}
    for name, m in named_modules(model):   # MoE layers return the share of tokens per expert
        if isinstance(m, MoE):
            m.register_forward_hook(lambda mod, inp, out, name=name: expert_load.__setitem__(name, out[2]))

    bar = tqdm(total=max_steps, initial=state["step"], unit="step", disable=fabric.global_rank != 0, dynamic_ncols=True)
    speeds, mems = [], [0.0]   # tokens/s per device and peak GB at each log, for the summary at the end
    t0, step0 = time.perf_counter(), state["step"]
    step_loss = 0.0   # the step's micro-batch losses, summed on the device for the finiteness check
    if fabric.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    while state["step"] < max_steps:
        rows = train_rows(len(train_data), state["iter_num"], fabric.global_rank, world, train.micro_batch_size, seed)
        x, y, doc = train_data.batch(rows, fabric.device)
        is_accumulating = (state["iter_num"] + 1) % accum != 0
        log_now = not is_accumulating and (state["step"] + 1) % train.log_interval == 0
        hooks = spike_hooks(model, sparsity) if log_now and config.spike_k else []
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            _, loss, aux = model(x, y, doc)
            for h in hooks:   # before backward: checkpointed blocks would run them again in the recompute
                h.remove()
            fabric.backward((loss + config.aux_loss_coef * aux) / accum)
        loss_avg.update(loss.detach())
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
            loss_val = loss_avg.compute().item()   # synchronizes devices, so the timing below is honest
            dt = time.perf_counter() - t0
            tok_s = (state["step"] - step0) * tokens_per_step / dt / world   # per device
            metrics = {"train/loss": loss_val, "train/ppl": math.exp(min(loss_val, 20)), "train/lr": lr,
                       "train/grad_norm": float(getattr(grad_norm, "full_tensor", lambda: grad_norm)()),   # FSDP
                       "perf/tokens_per_s_per_device": tok_s, "perf/tokens_seen": state["step"] * tokens_per_step}
            if peak:
                metrics["perf/mfu"] = flops_per_token * tok_s / peak
            if fabric.device.type == "cuda":
                metrics["perf/max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
                mems.append(metrics["perf/max_memory_gb"])
                torch.cuda.reset_peak_memory_stats()
            for name, load in expert_load.items():   # 1.0 = perfectly balanced; n_expert = all tokens to one expert
                metrics[f"moe/max_load.{name}"] = (load.max() * load.numel()).item()
            if sparsity:
                metrics["spike/zero_fraction"] = sum(sparsity.values()) / len(sparsity)
            fabric.log_dict(metrics, step=state["step"])
            speeds.append(tok_s)
            bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            t0, step0 = time.perf_counter(), state["step"]

        last = state["step"] == max_steps
        if state["step"] % eval.interval == 0 or last:
            val_loss, val_ppl = validate(fabric, model, val_data, train.micro_batch_size, eval.max_batches)
            fabric.log_dict({"val/loss": val_loss, "val/ppl": val_ppl}, step=state["step"])
            if fabric.global_rank == 0:
                bar.write(f"step {state['step']}: val loss {val_loss:.4f}, val ppl {val_ppl:.2f}")
            t0, step0 = time.perf_counter(), state["step"]   # validation time is not training time
        if (train.save_interval and state["step"] % train.save_interval == 0) or last:
            save(fabric, state, config, out_dir, train.keep_last)
            t0, step0 = time.perf_counter(), state["step"]
    bar.close()
    if len(speeds) > 1:   # the first interval holds start-up and compilation
        tok_s = float(np.median(speeds[1:]))
        mfu = f", MFU {flops_per_token * tok_s / peak:.1%}" if peak else ""
        mem = f", peak memory {max(mems):.1f} GB" if fabric.device.type == "cuda" else ""
        fabric.print(f"median {tok_s:.0f} tokens/s per device{mfu}{mem} ({flops_per_token:.3g} FLOP/token)")


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
def validate(fabric, model, data, micro_batch_size, max_batches):
    """Perplexity over the first validation rows; every device runs the same number of batches (FSDP needs it).

    exp of the token-weighted mean loss: the model's chunked loss never builds full logits (128k rows of them
    would not fit), which torchmetrics' Perplexity needs."""
    from torchmetrics import MeanMetric

    model.eval()
    nll = MeanMetric(sync_on_compute=True).to(fabric.device)
    world, rank = fabric.world_size, fabric.global_rank
    n = max(1, min(max_batches, len(data) // (micro_batch_size * world)))
    for i in range(n):
        rows = [((i * world + rank) * micro_batch_size + j) % len(data) for j in range(micro_batch_size)]
        x, y, doc = data.batch(rows, fabric.device)
        _, loss, _ = model(x, y, doc)
        nll.update(loss.float(), weight=(y != -100).sum())
    model.train()
    loss = nll.compute().item()
    return loss, math.exp(loss)


# ----------------------------------------------------------------------------- model setup

def fit_micro_batch(train, world_size):
    """train with a micro_batch_size that divides each device's share of global_batch_size (the largest that does,
    at most the one asked for), and a line saying so when it was lowered (None otherwise)."""
    g, m = train.global_batch_size, train.micro_batch_size
    if g % world_size:
        raise ValueError(f"train.global_batch_size={g} must be a multiple of the {world_size} devices (devices x "
                         f"num_nodes): every device takes the same number of rows")
    rows = g // world_size
    fit = max(d for d in range(1, min(m, rows) + 1) if rows % d == 0)
    if fit == m:
        return train, None
    return replace(train, micro_batch_size=fit), (f"train.micro_batch_size {m} -> {fit}: global_batch_size {g} over "
                                                  f"{world_size} device(s) is {rows} rows per device")


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
        ckpt = Config.from_yaml(Path(init_from) / "config.yaml")
        config = Config.from_dict({**ckpt.to_dict(), **overrides})
        if name is not None:   # run-time limits and token ids may differ (convert.py takes them from the source)
            from convert import differs

            diff = differs(config, Config.from_name(name, **overrides))
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
    from convert import checked_files, read_state

    files = checked_files(path, config)
    rank0 = not sharded or torch.distributed.get_rank() == 0
    state = read_state(path, files) if rank0 else {}
    if not sharded:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # rank 0 holds the full tensors; every rank receives its shards
    set_model_state_dict(model.module if hasattr(model, "module") else model, state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def checkpoint_blocks(model):
    """Per-block activation checkpointing: keep each block's input, recompute its inside during backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)   # no randomness inside a block


def parallelize(model, mesh, mixed=True):
    """FSDP2: shard every block, then the rest (embeddings, sinks, final norm, head); materialize meta weights.

    With mixed precision the sharded weights stay fp32 (optimizer precision) and each block is all-gathered in
    bf16; gradients are reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else \
        MixedPrecisionPolicy()
    dp = mesh["data_parallel"]
    for block in model.blocks:
        fully_shard(block, mesh=dp, mp_policy=mp)
    fully_shard(model, mesh=dp, mp_policy=mp)
    if any(p.is_meta for p in model.parameters()):
        cuda = mesh.device_type == "cuda"
        model.to_empty(device=torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu")
        with torch.no_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            if not cuda:   # CPU meshes draw each shard from the local generator: differ per rank, not a copy of rank 0
                warnings.filterwarnings("ignore", "DTensor random operators")
                torch.manual_seed(torch.initial_seed() + mesh.get_rank())
            model.apply(model._init_weights)   # the model's own init, applied to this rank's shards
    return model


def spike_hooks(model, out):
    """Record the fraction of zero spike counts at the input of every spiking projection (one forward)."""
    def hook(mod, inp, name):
        if inp[0].numel():   # an MoE expert may get no token
            out[name] = (spike_quant(inp[0].detach(), mod.spike_k)[0] == 0).float().mean().item()
    return [m.register_forward_pre_hook(partial(hook, name=n)) for n, m in named_modules(model)
            if isinstance(m, Linear) and m.spike_k is not None]


def named_modules(model):
    """Module names as in the checkpoint, whatever Fabric and activation checkpointing wrapped around them."""
    model = model.module if hasattr(model, "module") else model
    return ((n.replace("_checkpoint_wrapped_module.", ""), m) for n, m in model.named_modules())


# ----------------------------------------------------------------------------- checkpoints

COMPLETE = "complete"   # the file a checkpoint gets last, once every rank's part of it is on disk


def save(fabric, state, config, out_dir, keep_last):
    """out_dir/step-XXXXXXX/{state, config.yaml, complete}: written under a temp name, renamed when complete. Older
    checkpoints are deleted oldest first, each renamed away first: a kill never leaves half of one as step-*."""
    name = f"step-{state['step']:07d}"
    tmp, final = out_dir / f".tmp-{name}", out_dir / name
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config.to_yaml(tmp / "config.yaml")
    fabric.barrier()
    state["rng"] = get_rng_state()
    fabric.save(tmp / "state", state)
    fabric.barrier()
    if fabric.global_rank == 0:
        (tmp / COMPLETE).touch()
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

    from convert import save_checkpoint

    module = model.module if hasattr(model, "module") else model
    if torch.distributed.is_initialized():   # all ranks gather; rank 0 receives the full tensors on CPU
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = module.state_dict()
    if fabric.global_rank == 0:
        save_checkpoint({k: v.to(dtype) for k, v in state.items()}, config, out, tokenizer_dir)
        fabric.print(f"exported {out}")
    fabric.barrier()


@torch.no_grad()
def sample(model, tokenizer, prompt, n, temperature=0.8, top_k=50, seed=0):
    """A short continuation with the generation cache (the checkpoint's own check that it learned something)."""
    from generate import probs_of

    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor([tokenizer.encode(prompt)])
    cache = model.new_cache(1, idx.shape[1] + n)
    logits, _, _ = model(idx, cache=cache, last_only=True)
    out = []
    for _ in range(n):
        nxt = torch.multinomial(probs_of(logits[:, -1], temperature, top_k), 1, generator=gen)
        if nxt.item() == tokenizer.eos_id:
            break
        out.append(nxt.item())
        logits, _, _ = model(nxt.view(1, 1), cache=cache)
    return tokenizer.decode(out)


# ----------------------------------------------------------------------------- data: packed rows

class Packed:
    """One split of a prepared directory as fixed-length rows: row r holds tokens [r*T, r*T + T] of a shard.

    batch(rows) -> x [B, T] inputs, y [B, T] targets (-100: across a document boundary or not an assistant token
    in chat data), doc [B, T] document index within the row (non-decreasing), or None without doc_mask.
    """

    def __init__(self, path, split, seq_len, tokenizer=None, doc_mask=True):
        meta_file = Path(path) / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a prepared data directory (no meta.json): make it with "
                                    f"`python train.py prepare --inputs FILES --out {path}` or set data.inputs")
        meta = json.loads(meta_file.read_text())
        if tokenizer is not None and meta["tokenizer"] != tokenizer_hash(tokenizer):
            raise ValueError(f"{path} was tokenized with another tokenizer ({meta['tokenizer']}): prepare it again "
                             f"with this run's tokenizer")
        shards = meta["splits"][split]["shards"]
        self.T, self.doc_mask = seq_len, doc_mask
        self.tokens = [np.memmap(Path(path) / f"{s}.bin", dtype=np.uint32, mode="r") for s in shards]
        self.docs = [np.fromfile(Path(path) / f"{s}.idx", dtype=np.int64) for s in shards]
        self.masks = [np.memmap(Path(path) / f"{s}.mask", dtype=np.uint8, mode="r") if meta["chat"] else None
                      for s in shards]
        self.starts = np.cumsum([0] + [max(0, (len(t) - 1) // seq_len) for t in self.tokens])
        n_tok = meta["splits"][split]["tokens"]
        if self.starts[-1] == 0:
            raise ValueError(f"the {split} split of {path} has {n_tok} tokens, not one row of seq_len+1 = "
                             f"{seq_len + 1}: add data or lower train.seq_len")
        self.fingerprint = f"{meta['hash']}/{split}/{seq_len}"

    def __len__(self):
        return int(self.starts[-1])

    def row(self, r):
        s = int(np.searchsorted(self.starts, r, side="right")) - 1
        a = (r - int(self.starts[s])) * self.T
        tok = self.tokens[s][a:a + self.T + 1].astype(np.int64)
        doc = np.searchsorted(self.docs[s], np.arange(a, a + self.T + 1), side="right") - 1
        x, y = tok[:-1], tok[1:].copy()
        y[doc[1:] != doc[:-1]] = -100   # the next document's first token is not predictable from this one
        if self.masks[s] is not None:
            y[self.masks[s][a + 1:a + self.T + 1] == 0] = -100
        return x, y, doc[:-1] - doc[0]

    def batch(self, rows, device):
        x, y, doc = (torch.from_numpy(np.stack(a)) for a in zip(*(self.row(r) for r in rows)))
        if device.type == "cuda":
            x, y, doc = (t.pin_memory().to(device, non_blocking=True) for t in (x, y, doc))
        else:
            x, y, doc = x.to(device), y.to(device), doc.to(device)
        return x, y, doc if self.doc_mask else None


@lru_cache(maxsize=2)
def epoch_order(n_rows, epoch, seed):
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def train_rows(n_rows, iter_num, rank, world, micro_batch_size, seed=0):
    """Rows of micro-batch `iter_num` on `rank`: a fixed shuffle per epoch, so the position is just iter_num."""
    first = (iter_num * world + rank) * micro_batch_size
    return [int(epoch_order(n_rows, s // n_rows, seed)[s % n_rows]) for s in range(first, first + micro_batch_size)]


# ----------------------------------------------------------------------------- data: prepare

def prepare(*, inputs: list[str], out: Path, tokenizer_dir: Path = Path("assets/tokenizer"),
            val_fraction: float = 0.01, shard_tokens: int = 1 << 28, threads: int = 8) -> None:
    """Tokenize documents into memory-mapped uint32 shards with a document index and a validation split.

    Args:
        inputs: text files (one document each), .jsonl files (one document per line: {"text": str} or a chat
            {"messages": [{"role": ..., "content": ...}, ...]}), directories (their files, sorted, recursively), or
            `pydoc` (the documentation topics that ship with Python, one document per topic: the offline demo corpus).
        out: directory to write: {train,val}-NNNNN.bin (uint32 tokens), .idx (int64 document starts + end),
            .mask (uint8, 1 = take a loss: chat data only) and meta.json. Written under a temp name, then renamed.
        tokenizer_dir: the tokenizer of the model to train (a different one makes training refuse the data).
        val_fraction: every round(1/val_fraction)-th document goes to validation (there must be one).
        shard_tokens: tokens per shard file at most (documents never span shards).
        threads: encoding threads (the tokenizer releases the GIL).
    Every document ends with <|endoftext|>; chat documents are ChatML, loss on assistant tokens only. The same inputs
    and tokenizer give the same bytes.
    """
    from tqdm import tqdm

    from convert import atomic_dir

    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction={val_fraction}: training needs a validation split, use a value in (0, 0.5]")
    tok = Tokenizer(tokenizer_dir)
    files = list_inputs(inputs)
    every = round(1 / val_fraction)
    with atomic_dir(out) as tmp:
        tmp = Path(tmp)
        writers = {s: ShardWriter(tmp, s, shard_tokens) for s in ("train", "val")}
        n_doc = 0
        chat = False
        # tiktoken releases the GIL while it encodes; the bar closes before an input error is printed
        with ThreadPoolExecutor(threads) as pool, tqdm(total=sum(size for _, size in files), unit="B",
                                                       unit_scale=True, desc="tokenizing") as bar:
            for batch in document_batches(files, bar):
                encoded = pool.map(tok.encode, [d for d in batch if isinstance(d, str)])
                for d in batch:
                    if isinstance(d, str):
                        ids, mask = next(encoded), None
                    else:
                        ids, mask = tok.encode_chat(d)
                        chat = True
                    split = "val" if n_doc % every == every - 1 else "train"
                    writers[split].add(ids + [tok.eos_id], None if mask is None else mask + [False])
                    n_doc += 1
        if n_doc == 0:
            raise ValueError(f"no documents in {inputs}: text files must be non-empty, jsonl lines need a 'text' or "
                             f"'messages' field")
        if not writers["val"].n_docs:
            raise ValueError(f"{n_doc} documents are too few for val_fraction={val_fraction} (every {every}th "
                             f"document validates): add documents or raise val_fraction")
        splits = {s: w.close(chat) for s, w in writers.items()}
        meta = {"tokenizer": tokenizer_hash(tok), "chat": chat, "inputs": [str(i) for i in inputs], "splits": splits}
        meta["hash"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"{out}: " + ", ".join(f"{s} {v['docs']} documents {v['tokens']} tokens" for s, v in splits.items()))


class ShardWriter:
    """Documents of one split -> shard files of at most `shard_tokens` tokens."""

    def __init__(self, dir, split, shard_tokens):
        self.dir, self.split, self.limit = dir, split, shard_tokens
        self.shards, self.n_tokens, self.n_docs, self.chat = [], 0, 0, False
        self.buf, self.masks, self.n_buf = [], [], 0

    def add(self, ids, mask):
        if self.buf and self.n_buf + len(ids) > self.limit:
            self.flush(self.chat)
        self.buf.append(np.asarray(ids, dtype=np.uint32))   # 4 bytes a token while buffered, not a Python int
        self.masks.append(None if mask is None else np.asarray(mask, dtype=np.uint8))
        self.chat |= mask is not None
        self.n_buf += len(ids)
        self.n_tokens += len(ids)
        self.n_docs += 1

    def flush(self, chat):
        if not self.buf:
            return
        name = f"{self.split}-{len(self.shards):05d}"
        np.concatenate(self.buf).tofile(self.dir / f"{name}.bin")
        np.cumsum([0] + [len(b) for b in self.buf], dtype=np.int64).tofile(self.dir / f"{name}.idx")
        if chat:   # text documents in chat data: loss everywhere
            np.concatenate([np.ones(len(b), np.uint8) if m is None else m
                            for b, m in zip(self.buf, self.masks)]).tofile(self.dir / f"{name}.mask")
        self.shards.append(name)
        self.buf, self.masks, self.n_buf = [], [], 0

    def close(self, chat):
        self.flush(chat)
        # chat data found after the first shards were written: give the earlier ones all-ones masks
        for name in self.shards if chat else []:
            if not (self.dir / f"{name}.mask").exists():
                n = os.path.getsize(self.dir / f"{name}.bin") // 4
                np.ones(n, np.uint8).tofile(self.dir / f"{name}.mask")
        return {"shards": self.shards, "tokens": self.n_tokens, "docs": self.n_docs}


def list_inputs(inputs):
    """[(file or 'pydoc', size in bytes)] in a fixed order; a clear error for a path that is not there."""
    files = []
    for i in inputs:
        if i == "pydoc":
            import pydoc_data.topics
            files.append(("pydoc", sum(len(t) for t in pydoc_data.topics.topics.values())))
        elif os.path.isdir(i):
            found = sorted(f for f in glob.glob(os.path.join(i, "**", "*"), recursive=True) if os.path.isfile(f))
            files += [(f, os.path.getsize(f)) for f in found]
        elif os.path.isfile(i):
            files.append((i, os.path.getsize(i)))
        else:
            raise FileNotFoundError(f"input {i!r} is neither a file, a directory nor 'pydoc'")
    return files


def document_batches(files, bar, size=256):
    """Documents (a str, or a list of chat messages) in input order, in lists of `size`."""
    batch = []
    for f, nbytes in files:
        if f == "pydoc":
            import pydoc_data.topics
            docs = ((t, len(t)) for t in pydoc_data.topics.topics.values())
        elif f.endswith((".jsonl", ".json")):
            docs = jsonl_documents(f)
        else:
            with open(f, "rb") as fh:
                docs = [(utf8(fh.read(), f), nbytes)]
        for doc, n in docs:
            bar.update(n)
            if doc:
                batch.append(doc)
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


def utf8(data, where):
    """Text of a file's bytes; a binary or non-UTF-8 input is an error that names the file (and line)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.start} is {data[e.start]:#04x}): convert it to UTF-8 "
                         f"or leave it out of the inputs") from None
    if "\0" in text:
        raise ValueError(f"{where}: holds NUL bytes, a binary file rather than text: leave it out of the inputs")
    return text


def jsonl_documents(path):
    with open(path, "rb") as f:   # bytes: a decoding error can then name its line
        for n, raw in enumerate(f, 1):
            line = utf8(raw, f"{path}:{n}")
            if not line.strip():
                yield None, len(raw)
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e}): .json and .jsonl inputs hold one JSON object per "
                                 f"line") from None
            if isinstance(d, dict) and isinstance(d.get("text"), str):
                yield d["text"], len(raw)
            elif isinstance(d, dict) and isinstance(d.get("messages"), list):
                yield d["messages"], len(raw)
            else:
                raise ValueError(f"{path}:{n}: need {{'text': str}} or {{'messages': [{{'role', 'content'}}, ...]}}")


@lru_cache(maxsize=1)   # both splits check the run's tokenizer
def tokenizer_hash(tok):
    """Identity of a vocabulary (every token's bytes by id, and the specials): prepared data names its tokenizer."""
    h = hashlib.sha256(json.dumps(tok.special_tokens, sort_keys=True).encode())
    specials = set(tok.special_tokens.values())
    for i in range(tok.n_vocab):
        try:
            t = b"" if i in specials else tok.decode_bytes([i])
        except KeyError:   # an id between the last rank and the first special
            t = b""
        h.update(len(t).to_bytes(4, "little") + t)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the demo tokenizer

def build_tokenizer(*, out: Path = Path("assets/tokenizer"), vocab_size: int = 2048,
                    inputs: list[str] = ["pydoc"]) -> None:
    """Train a byte-level BPE (Qwen's pre-tokenizer, vocab_size - 3 ranks + the ChatML specials) and write it to out.

    Args:
        out: directory to write tokenizer.tiktoken and tokenizer.json to.
        vocab_size: tokens in all, the 3 ChatML specials included.
        inputs: training text, as for `train.py prepare` (default: the documentation that ships with Python).
    """
    from tqdm import tqdm

    files = list_inputs(inputs)
    with tqdm(total=sum(s for _, s in files), unit="B", unit_scale=True, desc="reading") as bar:
        texts = [d for b in document_batches(files, bar) for d in b if isinstance(d, str)]
    n_ranks = vocab_size - len(CHAT_SPECIALS)
    ranks = train_bpe(texts, n_ranks, QWEN_PAT)
    save_tokenizer(str(out), ranks, {s: n_ranks + i for i, s in enumerate(CHAT_SPECIALS)})
    print(f"{out}: {len(ranks)} ranks + {len(CHAT_SPECIALS)} special tokens")


def train_bpe(texts, n_ranks, pat_str):
    """Byte-level BPE: the 256 bytes, then the most frequent adjacent pair merged until n_ranks tokens.

    Pre-tokenized words are counted once; a merge revisits only the words holding its pair. Ties go to the larger
    pair (bytes order), so the result is deterministic. A tiktoken Encoding with these ranks reproduces the merges.
    """
    import regex

    words = Counter(w.encode() for t in texts for w in regex.findall(pat_str, t))
    seqs, freqs = [[bytes([b]) for b in w] for w in words], list(words.values())
    ranks = {bytes([b]): b for b in range(256)}
    pairs, where = Counter(), defaultdict(set)
    for i, (s, f) in enumerate(zip(seqs, freqs)):
        for p in zip(s, s[1:]):
            pairs[p] += f
            where[p].add(i)
    while len(ranks) < n_ranks and pairs:
        a, b = best = max(pairs, key=lambda p: (pairs[p], p))
        if a + b not in ranks:
            ranks[a + b] = len(ranks)
        for i in sorted(where.pop(best)):
            s, f = seqs[i], freqs[i]
            for p in zip(s, s[1:]):
                pairs[p] -= f
                if not pairs[p]:
                    del pairs[p]
            new, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and s[j] == a and s[j + 1] == b:
                    new.append(a + b)
                    j += 2
                else:
                    new.append(s[j])
                    j += 1
            seqs[i] = new
            for p in zip(new, new[1:]):
                pairs[p] += f
                where[p].add(i)
    return ranks


# ----------------------------------------------------------------------------- dry run: the memory plan

# dense bf16 tensor-core peak FLOP/s (no sparsity), matched against torch.cuda.get_device_name
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12,
              "B200": 2250e12, "L40S": 362e12}


def device_name(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((k for k in sorted(PEAK_FLOPS, key=len, reverse=True) if k in name), None)


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


def estimate_memory(config, n_params, micro_batch_size, seq_len, world_size, strategy, precision, checkpointing):
    """Bytes per device by item: weights, grads, optimizer, gathered (FSDP all-gather), activations, logits."""
    c, tokens = config, micro_batch_size * (seq_len + config.n_sink)
    w, g, o = {"bf16-mixed": (4, 4, 8), "bf16-true": (2, 2, 4), "32-true": (4, 4, 8)}.get(precision, (4, 4, 8))
    shard = world_size if strategy == "fsdp" else 1
    emb = 2 * c.vocab_size * c.n_embd
    block = (n_params - emb - c.n_sink * c.n_embd) / c.n_layer
    per_layer = activation_bytes(c, seq_len)
    acts = tokens * (sum(per_layer) if not checkpointing else 2 * c.n_embd * c.n_layer + max(per_layer))
    mem = {"weights": w * n_params / shard, "grads": g * n_params / shard, "optimizer": o * n_params / shard,
           # FSDP holds two blocks' full bf16 weights (current + prefetched) and the embeddings + head while they run
           "gathered": (2 * 2 * block + 2 * emb) * (shard > 1),
           "activations": acts,
           # the loss, 8192 rows at a time: fp32 logits and bf16 softmax of a chunk; the head's gradient (fp32
           # while it accumulates, then in the weights' dtype) and the input's, made in the forward pass
           "logits": min(micro_batch_size * seq_len, 8192) * c.vocab_size * 6 + c.vocab_size * c.n_embd * (4 + w)
                     + tokens * c.n_embd * 2}
    if precision == "bf16-mixed" and strategy != "fsdp":
        mem["gathered"] = 2 * n_params   # autocast keeps a bf16 copy of every weight during the forward
    mem["total"] = sum(mem.values())
    return mem


def plan(config, train, world_size, strategy, precision):
    with torch.device("meta"):
        model = GPT(config)
    n, active = model.num_params(), model.num_params(active_only=True)
    fpt = model.flops_per_token(train.seq_len)
    lines = [f"{config.name}: {n / 1e9:.3f}B parameters ({active / 1e9:.3f}B active per token), "
             f"{fpt / 1e9:.1f} GFLOP per token for training at seq_len {train.seq_len} (forward + backward)",
             f"memory per device: {strategy} over {world_size} device(s), {precision}, micro batch "
             f"{train.micro_batch_size} x {train.seq_len}   (GB)",
             f"  {'':<13}{'no ckpt':>9}{'ckpt':>9}"]
    m0, m1 = (estimate_memory(config, n, train.micro_batch_size, train.seq_len, world_size, strategy, precision, ck)
              for ck in (False, True))
    for k in m0:
        lines.append(f"  {k:<13}{m0[k] / 1e9:>9.1f}{m1[k] / 1e9:>9.1f}")
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
        sys.exit(f"error: {e}")   # as convert.py, generate.py and spiking.py: one line, exit status 1

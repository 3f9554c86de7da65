"""Evaluate a checkpoint (ours, float or W8ASpike, or a released SpikingBrain-7B directory) on a text.

    python eval.py spikes --ckpt out/tiny/final --text valid.txt --k '[2,3,4]'   # one table: sparsity, spikes per
                                                                                  # channel, silent %, energy, d ppl
    python eval.py spikes --ckpt out/tiny/final-w8a --text valid.txt --k '[3]' --device cuda

`spikes` runs the text once without spikes (the baseline perplexity), then once per k with every projection's
input spiking at threshold mean|x| / k, counting spikes with spiking.collect_stats: sparsity over a 3-step
window (the report's 69.15% measure), spikes per channel, the share of silent inputs, the energy model's saving
against FP16 and INT8 MACs, and the perplexity change.
"""
import math
import sys

import torch
import torch.nn as nn

import convert
from model import Linear, check_spike_k
from spiking import W8ASpikeLinear, collect_stats


# ----------------------------------------------------------------------------- perplexity and spikes per k

@torch.no_grad()
def perplexity(model, rows, batch_size=8):
    """rows [N, T + 1] token ids -> exp(mean next-token cross-entropy over all N * T predictions)."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        b = rows[i:i + batch_size].to(device)
        _, loss, _ = model(b[:, :-1], targets=b[:, 1:])
        total += loss.item() * b[:, 1:].numel()
        n += b[:, 1:].numel()
    return math.exp(total / n)


def check_sweep(ks, coding, window):
    """The sweep's arguments, checked before a model is loaded or run (a bad one would fail after the baseline)."""
    for k in ks:
        if k is None:
            raise ValueError(f"k={list(ks)}: the non-spiking baseline comes first by itself; give numbers > 0")
        check_spike_k(k, "k")
    with collect_stats(nn.Module(), coding=coding, window=window):   # its argument checks; hooks nothing
        pass


@torch.no_grad()
def spike_sweep(model, rows, ks, *, batch_size=8, coding="bidirectional", window=3):
    """Statistics and perplexity at each k, after a non-spiking baseline (k None). rows [N, T + 1] token ids.

    Returns one dict per k (the baseline first): k, ppl, dppl (ppl - baseline), and for spiking rows the
    SpikeStats.summary() fields. The model's spike_k settings are restored afterwards.
    """
    check_sweep(ks, coding, window)
    saved = [(m, m.spike_k) for m in model.modules() if isinstance(m, (Linear, W8ASpikeLinear))]
    saved_cfg, was_training = model.config.spike_k, model.training
    model.eval()
    try:
        model.set_spike_k(None)
        base = perplexity(model, rows, batch_size)
        out = [dict(k=None, ppl=base, dppl=0.0)]
        for k in ks:
            model.set_spike_k(k)
            with collect_stats(model, coding=coding, window=window) as st:
                ppl = perplexity(model, rows, batch_size)
            out.append(dict(k=k, ppl=ppl, dppl=ppl - base, **st.summary()))
    finally:
        for m, old in saved:
            m.spike_k = old
        model.config.spike_k = saved_cfg
        model.train(was_training)
    return out


def format_table(results, window=3):
    """The sweep's rows as one fixed-width text table."""
    head = (f"{'k':>5} {'ppl':>9} {'d ppl':>8} {f'sparsity@{window}':>12} {'spikes/ch':>9} {'silent':>7} "
            f"{'|c|<=7':>7} {'fire rate':>9} {'save/FP16':>9} {'save/INT8':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        if r["k"] is None:
            lines.append(f"{'off':>5} {r['ppl']:9.3f}")
            continue
        lines.append(f"{r['k']:5g} {r['ppl']:9.3f} {r['dppl']:+8.3f} {100 * r['sparsity']:11.2f}% "
                     f"{r['spikes_per_channel']:9.3f} {100 * r['silent']:6.2f}% {100 * r['share_le7']:6.2f}% "
                     f"{r['firing_rate']:9.3f} {100 * r['saving_vs_fp16']:8.2f}% {100 * r['saving_vs_int8']:8.2f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands

def spikes(*, ckpt: str, text: str, k: list[float] = [2.0, 3.0, 4.0], seq_len: int = 512, batch_size: int = 4,
           max_tokens: int | None = 65536, coding: str = "bidirectional", window: int = 3, device: str = "cpu",
           dtype: convert.DType | None = None, tokenizer: str | None = None) -> None:
    """Spike statistics, energy saving and perplexity change of a checkpoint over a text, for each k.

    Args:
        ckpt: checkpoint directory: ours (float or W8ASpike) or a released SpikingBrain-7B directory
        text: UTF-8 text file to measure on
        k: threshold parameters to sweep, e.g. --k '[2,3,4]'
        seq_len: tokens per row
        batch_size: rows per forward
        max_tokens: use at most this many tokens of the text (None: all)
        coding: signed spike coding for spike events and sparsity (ternary, bidirectional, twos)
        window: time steps of the sparsity window (the report uses 3)
        device: cpu or cuda
        dtype: e.g. bfloat16; default: as saved
        tokenizer: tokenizer directory, if not the checkpoint's
    """
    check_sweep(k, coding, window)   # arguments, tokenizer and text fail before the model loads
    rows = convert.text_rows(convert.load_tokenizer(ckpt, tokenizer), text, seq_len, max_tokens)
    model, _ = convert.load_checkpoint(ckpt, device, dtype)
    results = spike_sweep(model, rows, k, batch_size=batch_size, coding=coding, window=window)
    print(f"{ckpt}: {rows.numel()} tokens of {text}, {coding} coding")
    print(format_table(results, window))


if __name__ == "__main__":
    from jsonargparse import CLI

    try:
        CLI({"spikes": spikes})
    except (ValueError, OSError) as e:   # bad input: the message says what and where, a traceback adds nothing
        sys.exit(f"error: {e}")

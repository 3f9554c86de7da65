"""Evaluate a checkpoint (ours, float, W8ASpike or FP8, or a released SpikingBrain-7B directory): lm-evaluation-harness
tasks, a long-context recall suite, and spike statistics.

    python eval.py lm --ckpt out/tiny/final --tasks '[my_tasks/qa.yaml]'           # a local task, offline
    python eval.py lm --ckpt ckpt/sb7b --tasks '[mmlu,arc_challenge,hellaswag,cmmlu,ceval-valid]' --hub true \
        --device cuda --batch_size 16                                              # the report's benchmarks
    python eval.py recall --ckpt out/tiny/final --lengths '[512,1024,2048,4096]' --depths '[0,25,50,75,100]' \
        --samples 20 --out out/recall                                              # length x depth grid + PNG
    python eval.py spikes --ckpt out/tiny/final --text valid.txt --k '[2,3,4]'     # one table: sparsity, spikes per
                                                                                   # channel, silent %, energy, d ppl
    python eval.py spikes --ckpt out/tiny/final-w8a --text valid.txt --k '[3]' --device cuda

`lm` runs lm-evaluation-harness (`pip install -e ".[eval]"`) on our model through `lm_class()`, an lm-eval `LM`:
log-likelihoods are exact sums of the continuation tokens' log-probabilities (rows batched and right-padded; a row
longer than --prefill_chunk runs through the generation cache in chunks), perplexity follows lm-eval's rolling
windows, generation uses model.sample and stop strings. Offline by default: only tasks in --include_path or given
as YAML files, whose data are local files (`dataset_path: json`, `dataset_kwargs.data_files`); --hub true adds
lm-eval's own task catalogue and lets it download their datasets from the Hugging Face hub.

`recall` needs no data: passkey retrieval, multi-key needle-in-a-haystack (RULER's niah_multikey) and multi-query
associative recall (MQAR, as text: a dense list of key-number pairs, several asked at once), generated from a seed
at each context length and needle depth (0% = right after the instructions, 100% = right before the question),
answered greedily and scored against the needle's number. It prints one length x depth accuracy table per task and
with --out writes recall.json and a PNG heatmap per task.

`spikes` runs the text once without spikes (the baseline perplexity), then once per k with every projection's
input spiking at threshold mean|x| / k, counting spikes with spiking.collect_stats: sparsity over a 3-step
window (the report's 69.15% measure), spikes per channel, the share of silent inputs, the energy model's saving
against FP16 and INT8 MACs, and the perplexity change.
"""
import functools
import json
import math
import os
import random
import re
import struct
import sys
import zlib

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import convert
from model import ExpertLinear, Linear, check_spike_k, sample
from spiking import W8ASpikeLinear, collect_stats, quantized_format

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    saved = [(m, m.spike_k) for m in model.modules() if isinstance(m, (Linear, ExpertLinear, W8ASpikeLinear))]
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


# ----------------------------------------------------------------------------- scoring and generating token ids

@torch.no_grad()
def score(model, rows, n_scored, chunk=4096):
    """Log-likelihood of the last n_scored[i] tokens of each token list rows[i], every token predicted from all
    tokens before it in its row. Returns [(sum of log-probabilities, whether greedy decoding gives every one)].

    The rows are right-padded into one batch: padding after a row's end changes nothing before it (causal). Inputs
    longer than `chunk` run through a generation cache: the prefix no row scores with last_only (no logits), then
    `chunk` positions at a time, so memory holds one chunk's [B, chunk, vocab] logits, never the whole row's.
    """
    dev = model.lm_head.weight.device
    B, L = len(rows), max(map(len, rows)) - 1                          # L input positions per row
    if L < 1:
        return [(0.0, True)] * B
    ids = torch.zeros(B, L + 1, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    ids = ids.to(dev)
    last = torch.tensor([len(r) - 1 for r in rows], device=dev)       # row i scores inputs first[i] .. last[i] - 1
    first = last - torch.tensor(n_scored, device=dev)
    lp = torch.zeros(B, dtype=torch.float64, device=dev)
    greedy = torch.ones(B, dtype=torch.bool, device=dev)

    def take(logits, a):   # logits [B, T, V] of inputs a .. a + T - 1; only the scored rows go to float32
        t = torch.arange(a, a + logits.shape[1], device=dev)
        m = (t >= first[:, None]) & (t < last[:, None])               # (B, T) positions to score
        row, y, sel = m.nonzero()[:, 0], ids[:, a + 1:a + 1 + logits.shape[1]][m], logits[m].float()   # (N, V)
        lp.index_add_(0, row, sel.log_softmax(-1).gather(-1, y[:, None])[:, 0].double())
        greedy[row[sel.argmax(-1) != y]] = False

    if L <= chunk:                                                     # fits: one forward, no cache
        take(model(ids[:, :-1])[0], 0)
    else:
        cache, start = model.new_cache(B, L), int(first.min())
        for a in range(0, start, chunk):
            model(ids[:, a:min(a + chunk, start)], cache=cache, last_only=True)
        for a in range(start, L, chunk):
            take(model(ids[:, a:min(a + chunk, L)], cache=cache)[0], a)
    return list(zip(lp.tolist(), greedy.tolist()))


def stop_token_ids(tok):
    return {tok.eos_id} | {tok.special_tokens[s] for s in ("<|endoftext|>", "<|im_end|>") if s in tok.special_tokens}


@torch.no_grad()
def complete(model, tok, ids, max_new_tokens, until=(), *, chunk=4096, temperature=0.0, top_k=None, top_p=None,
             generator=None):
    """Text generated after the token ids `ids` (prefilled through a cache, `chunk` tokens per forward) until an
    end-of-text token, a stop string or max_new_tokens, cut before the first stop string. temperature 0: greedy."""
    dev, stops = model.lm_head.weight.device, stop_token_ids(tok)
    ids = ids or [tok.eos_id]                                          # nothing to condition on: start a document
    cache, x = model.new_cache(1, len(ids) + max_new_tokens), torch.tensor([ids], device=dev)
    for a in range(0, len(ids), chunk):
        logits = model(x[:, a:a + chunk], cache=cache, last_only=True)[0]
    out, text = [], ""
    for _ in range(max_new_tokens):
        nxt = sample(logits[:, -1, :tok.n_vocab], temperature, top_k, top_p, generator)   # never a padded-vocab id
        if nxt.item() in stops:
            break
        out.append(nxt.item())
        text = tok.decode_bytes(out).decode("utf-8", errors="replace")
        if any(s in text for s in until):
            break
        logits = model(nxt, cache=cache)[0]
    return text[:min([text.find(s) for s in until if s in text], default=len(text))]


# ----------------------------------------------------------------------------- lm-evaluation-harness

@functools.cache
def lm_class():
    """lm-eval's LM for our models, made on first use (lm-eval is the optional extra [eval]; eval.py imports without
    it). SpikingBrainLM(model, tokenizer, batch_size=8, max_length=None, prefill_chunk=4096, max_gen_toks=256)
    serves any model convert.load returns, spiking or not."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class SpikingBrainLM(TemplateLM):
        def __init__(self, model, tokenizer, *, batch_size=8, max_length=None, prefill_chunk=4096, max_gen_toks=256):
            super().__init__()
            if batch_size < 1 or prefill_chunk < 1 or max_gen_toks < 1 or (max_length is not None and max_length < 2):
                raise ValueError(f"need batch_size >= 1, prefill_chunk >= 1, max_gen_toks >= 1, max_length >= 2; got "
                                 f"{batch_size}, {prefill_chunk}, {max_gen_toks}, {max_length}")
            self.model, self.tok = model.eval(), tokenizer
            self.batch_size, self.prefill_chunk, self.max_gen_toks = batch_size, prefill_chunk, max_gen_toks
            self._max_length = max_length or model.config.max_seq_len
            if self._max_length > model.config.max_seq_len:
                raise ValueError(f"max_length={max_length} is beyond {model.config.name}'s limit config.max_seq_len="
                                 f"{model.config.max_seq_len}")
            self._device = model.lm_head.weight.device

        @property
        def eot_token_id(self):
            return self.tok.eos_id

        @property
        def max_length(self):
            return self._max_length

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return self.tok.encode(string)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            """requests: (key or None, context ids, continuation ids); each row keeps its last max_length + 1 tokens
            (as lm-eval's HFLM). Longest rows first: least padding, and a batch too big for memory fails at once."""
            rows = []
            for key, ctx, cont in requests:
                if len(cont) > self.max_length:
                    raise ValueError(f"a continuation of {len(cont)} tokens is longer than max_length="
                                     f"{self.max_length}: raise --max_length (at most config.max_seq_len)")
                rows.append(((ctx + cont)[-(self.max_length + 1):], len(cont)))
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
            out = [None] * len(rows)
            for b in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood", disable=disable_tqdm):
                idx = order[b:b + self.batch_size]
                for i, r in zip(idx, score(self.model, [rows[i][0] for i in idx], [rows[i][1] for i in idx],
                                           self.prefill_chunk)):
                    out[i] = r
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            """Each text's log-likelihood in windows of max_length tokens (lm-eval's get_rolling_token_windows:
            the first token conditioned on end-of-text, every token predicted once, each window after the first
            with as much context as fits)."""
            windows, owner = [], []
            for i, r in enumerate(requests):
                for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                        self.tok_encode(r.args[0]), self.prefix_token_id, self.max_length, context_len=1)):
                    windows.append((None, ctx, cont))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
                totals[i] += lp
            for r, t in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", r.args, t)
            return totals

        def generate_until(self, requests, disable_tqdm=False):
            """One request at a time (the cache holds one position per row for the whole batch, so ragged prompts do
            not batch): the context's last max_length - max_gen_toks tokens, then greedy or sampled tokens."""
            eot, out = self.tok.decode([self.eot_token_id]), []
            for r in tqdm(requests, desc="generate_until", disable=disable_tqdm):
                context, gen_kwargs = r.args
                kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                until, n = handle_stop_sequences(kw.pop("until", None), eos=eot), kw.pop("max_gen_toks")
                if n >= self.max_length:
                    raise ValueError(f"max_gen_toks={n} leaves no room for a prompt in max_length={self.max_length}")
                text = complete(self.model, self.tok, self.tok_encode(context)[-(self.max_length - n):], n, until,
                                chunk=self.prefill_chunk, temperature=kw["temperature"] if kw["do_sample"] else 0.0,
                                top_k=kw.get("top_k"), top_p=kw.get("top_p"))
                self.cache_hook.add_partial("generate_until", r.args, text)
                out.append(text)
            return out

    return SpikingBrainLM


# ----------------------------------------------------------------------------- long-context recall

RECALL_TASKS = ("passkey", "multikey", "mqar")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]      # keys are made-up words: no word list needed
DIGITS = 5                                                            # every needle's value is a 5-digit number


def _unique(rng, n, make):
    out, seen = [], set()
    while len(out) < n:
        x = make(rng)
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _word(rng):
    return "".join(rng.choice(SYLLABLES) for _ in range(3))


def _number(rng):
    return str(rng.randrange(10 ** (DIGITS - 1), 10 ** DIGITS))


def _fit(tok, make, unit_tokens, budget, what):
    """make(n) -> a prompt with n filler units; the largest n whose prompt has at most `budget` tokens (estimated
    from unit_tokens per unit, then corrected on the real token count). `what` starts the error if none fits."""
    n = max(0, int((budget - len(tok.encode(make(0)))) / unit_tokens))
    while True:
        size = len(tok.encode(text := make(n)))
        if size <= budget:
            return text
        if n == 0:
            raise ValueError(f"{what}: it needs {size} tokens before any filler and {budget} are left; give longer "
                             f"lengths")
        n = max(0, n - max(1, math.ceil((size - budget) / unit_tokens)))


def recall_sample(tok, task, length, depth, seed, i, n_keys=4, n_queries=4):
    """Sample i of one grid cell, a function of (seed, task, length, depth, i) and the tokenizer alone.

    Returns a dict: prompt (at most length - max_new_tokens tokens), answer (the expected continuation), values (the
    numbers asked for, in order), choices (every number in the prompt: guessing among them scores about
    1 / len(choices)), max_new_tokens (the answer's tokens + 2).
    """
    rng = random.Random(f"{seed}/{task}/{length}/{depth}/{i}")          # str seeds hash the same in every process
    d = depth / 100
    if task in ("passkey", "multikey"):
        if task == "passkey":   # Mohtashami & Jaggi (2023)
            values = [_number(rng)]
            head = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                    "I will quiz you about the pass key afterwards.\n")
            needles = [(d, f"The pass key is {values[0]}. Remember it. {values[0]} is the pass key.")]
            tail = "\nWhat is the pass key? The pass key is"
        else:   # RULER's niah_multikey: the asked key's needle at depth, the other keys' anywhere
            keys, nums = _unique(rng, n_keys, _word), _unique(rng, n_keys, _number)
            values = nums[:1]
            head = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                    "I will quiz you about the numbers afterwards.\n")
            needles = [(d if j == 0 else rng.random(), f"One of the special magic numbers for {k} is: {v}.")
                       for j, (k, v) in enumerate(zip(keys, nums))]
            tail = (f"\nWhat is the special magic number for {keys[0]} mentioned in the provided text? The special "
                    f"magic number for {keys[0]} mentioned in the provided text is")
        unit = sum(len(tok.encode(" " + s)) for s in FILLER) / len(FILLER)

        def make(n):   # n filler sentences, the needles among them
            body = [FILLER[j % len(FILLER)] for j in range(n)]
            for at, text in sorted(needles, key=lambda x: -x[0]):        # from the back: indices stay valid
                body.insert(round(at * n), text)
            return head + " ".join(body) + tail
    elif task == "mqar":   # key-number pairs fill the context; the asked ones sit together at depth, asked shuffled
        ask = list(zip(_unique(rng, n_queries, _word), _unique(rng, n_queries, _number)))
        order = rng.sample(range(n_queries), n_queries)
        values = [ask[j][1] for j in order]
        keys, nums, rest = {k for k, _ in ask}, set(values), []
        head = "Memorize the number of every key. I will ask for some of them afterwards.\n"
        tail = "Numbers of " + ", ".join(ask[j][0] for j in order) + ":"

        def pairs(n):   # the first n other pairs, drawn as needed (the same draws whatever n is asked first)
            while len(rest) < n:
                k, v = _word(rng), _number(rng)
                if k not in keys and v not in nums:
                    keys.add(k)
                    nums.add(v)
                    rest.append((k, v))
            return rest[:n]
        unit = sum(len(tok.encode(f"{k}: {v}\n")) for k, v in pairs(16)) / 16

        def make(n):
            body, at = pairs(n), round(d * n)
            return head + "".join(f"{k}: {v}\n" for k, v in body[:at] + ask + body[at:]) + tail
    else:
        raise ValueError(f"recall task {task!r}: choose from {list(RECALL_TASKS)}")
    answer = " " + " ".join(values)
    max_new = len(tok.encode(answer)) + 2
    prompt = _fit(tok, make, unit, length - max_new,
                  f"length {length} is too short for a {task} prompt ({max_new} tokens go to the answer)")
    return dict(task=task, length=length, depth=depth, prompt=prompt, answer=answer, values=values,
                choices=list(dict.fromkeys(re.findall(r"\d+", prompt))), max_new_tokens=max_new)


def recall_score(output, values):
    """Share of the asked numbers that the output's numbers give in order (a missing or wrong one scores 0)."""
    got = re.findall(r"\d+", output)
    return sum(j < len(got) and got[j] == v for j, v in enumerate(values)) / len(values)


def recall_grid(answer, tok, tasks=RECALL_TASKS, lengths=(1024,), depths=(0, 25, 50, 75, 100), samples=10, seed=0,
                n_keys=4, n_queries=4):
    """Accuracy per task, [length][depth], of answer(prompt, max_new_tokens) -> text (greedy decoding with the
    model: greedy_answer) on `samples` generated prompts per cell."""
    grid = {t: [[0.0] * len(depths) for _ in lengths] for t in tasks}
    cells = [(t, a, L, b, dp) for t in tasks for a, L in enumerate(lengths) for b, dp in enumerate(depths)]
    for t, a, L, b, dp in tqdm(cells, desc="recall", disable=len(cells) < 4):
        for i in range(samples):
            s = recall_sample(tok, t, L, dp, seed, i, n_keys, n_queries)
            grid[t][a][b] += recall_score(answer(s["prompt"], s["max_new_tokens"]), s["values"]) / samples
    return grid


def greedy_answer(model, tok, chunk=4096):
    """The answer function of a model: greedy decoding of the prompt, ended by a newline."""
    return lambda prompt, n: complete(model, tok, tok.encode(prompt), n, ("\n",), chunk=chunk)


def format_grid(grid, lengths, depths, samples):
    """One fixed-width table per task: rows are lengths, columns needle depths, cells accuracy %."""
    lines = []
    for t, acc in grid.items():
        head = f"{t + f' ({samples} per cell)':<22}" + "".join(f"{f'{dp:g}%':>7}" for dp in depths)
        lines += [head, "-" * len(head)]
        lines += [f"{f'{L} tokens':<22}" + "".join(f"{100 * a:7.1f}" for a in row) for L, row in zip(lengths, acc)]
        lines.append("")
    return "\n".join(lines[:-1])


# 3 x 5 pixel glyphs for the heatmap's numbers, row by row
GLYPHS = {c: [int(b) for b in bits] for c, bits in {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "k": "100101110101101", "M": "101111111101101",
    "%": "101001010100101"}.items()}


def _draw(img, x, y, text, scale=2):
    for c in text:
        g = np.array(GLYPHS[c], dtype=bool).reshape(5, 3).repeat(scale, 0).repeat(scale, 1)
        img[y:y + 5 * scale, x:x + 3 * scale][g] = 0
        x += 4 * scale


def _short(n):
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}k" if n >= 1024 and n % 1024 == 0 \
        else str(n)


def heatmap(acc, lengths, depths, cell=(40, 24), zoom=2):
    """acc [lengths][depths] in [0, 1] -> an RGB image [H, W, 3] uint8: red (0) .. yellow .. green (1) cells with
    their accuracy %, lengths down the left (shortest on top), depths % along the top; every pixel zoom x zoom."""
    W, H = cell
    left, top = 8 * max(len(_short(L)) for L in lengths) + 8, 20
    img = np.full((top + H * len(lengths), left + W * len(depths), 3), 255, dtype=np.uint8)
    for b, dp in enumerate(depths):
        _draw(img, left + b * W + 2, 4, f"{round(dp)}%")
    for a, L in enumerate(lengths):
        _draw(img, 4, top + a * H + 7, _short(L))
        for b in range(len(depths)):
            p = float(acc[a][b])
            img[top + a * H:top + (a + 1) * H - 1, left + b * W:left + (b + 1) * W - 1] = \
                (round(255 * min(1, 2 - 2 * p)), round(255 * min(1, 2 * p)), 64)
            _draw(img, left + b * W + 6, top + a * H + 7, str(round(100 * p)))
    return img.repeat(zoom, 0).repeat(zoom, 1)


def write_png(path, img):
    """An RGB uint8 image [H, W, 3] as a PNG file (8-bit truecolor, no filter): zlib and struct, no imaging library."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    H, W, _ = img.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = np.concatenate([np.zeros((H, 1), np.uint8), img.reshape(H, 3 * W)], 1).tobytes()   # filter 0 per row
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- commands

def spikes(*, ckpt: str, text: str, k: list[float] = [2.0, 3.0, 4.0], seq_len: int = 512, batch_size: int = 4,
           max_tokens: int | None = 65536, coding: str = "bidirectional", window: int = 3, device: str = "cpu",
           dtype: convert.DType | None = None, tokenizer: str | None = None) -> None:
    """Spike statistics, energy saving and perplexity change of a checkpoint over a text, for each k.

    Args:
        ckpt: checkpoint directory: ours (float or W8ASpike; FP8 is refused: it has no run without spikes) or a
            released SpikingBrain-7B directory
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
    if quantized_format(model) == "FP8":
        raise ValueError(f"{ckpt} is an FP8 checkpoint, whose layers take spike counts only: the sweep's baseline "
                         f"without spikes cannot run on it; measure the float checkpoint it was made from")
    results = spike_sweep(model, rows, k, batch_size=batch_size, coding=coding, window=window)
    print(f"{ckpt}: {rows.numel()} tokens of {text}, {coding} coding")
    print(format_table(results, window))


def load_model(ckpt, device, dtype, tokenizer, spike):
    """convert.load with the generation defaults (bfloat16 on CUDA, float32 on CPU) and spiking at `spike`."""
    check_spike_k(spike, "spike")
    dt = convert.resolve_dtype(dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model, tok = convert.load(ckpt, device, dt, tokenizer)
    if spike is not None:
        model.set_spike_k(spike)
    return model, tok


def lm(*, ckpt: str, tasks: list[str], include_path: list[str] | None = None, limit: float | None = None,
       num_fewshot: int | None = None, batch_size: int = 8, max_length: int | None = None, prefill_chunk: int = 4096,
       max_gen_toks: int = 256, hub: bool = False, out: str | None = None, seed: int = 1234,
       spike: float | None = None, device: str = DEFAULT_DEVICE, dtype: convert.DType | None = None,
       tokenizer: str | None = None) -> None:
    """lm-evaluation-harness tasks on a checkpoint; prints lm-eval's results table.

    Args:
        ckpt: checkpoint directory: ours (float, W8ASpike or FP8) or a released SpikingBrain-7B directory
        tasks: task names (from --include_path, or lm-eval's catalogue with --hub true) or task YAML files
        include_path: directories of task YAML files (their data local: dataset_path json, csv or parquet)
        limit: at most this many documents per task (a value below 1: that share of them)
        num_fewshot: examples in each prompt (default: the task's)
        batch_size: rows per forward for log-likelihoods
        max_length: longest row in tokens (default: config.max_seq_len); longer contexts keep their end
        prefill_chunk: rows longer than this run through the cache this many tokens at a time
        max_gen_toks: default longest generation (tasks may set their own)
        hub: add lm-eval's built-in tasks and let it download their datasets from the Hugging Face hub
        out: directory for results.json (with every sample's inputs and outputs)
        seed: python, numpy, torch and few-shot seeds, as lm-eval sets them
        spike: spiking activations with threshold mean|x| / spike
        device: cuda or cpu
        dtype: default bfloat16 on CUDA, float32 on CPU
        tokenizer: tokenizer directory, if not the checkpoint's
    """
    if not hub:   # read before huggingface_hub and datasets are imported: nothing may leave this machine
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{e}: the lm command needs lm-evaluation-harness: pip install -e \".[eval]\"") \
            from None
    for p in include_path or ():
        if not os.path.isdir(p):
            raise FileNotFoundError(f"--include_path {p} is not a directory of task YAML files")
    manager = TaskManager(include_path=include_path, include_defaults=hub)
    unknown = [t for t in tasks if t not in manager.all_tasks and not os.path.isfile(t)]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: give task YAML files or --include_path DIR holding them" +
                         ("" if hub else "; lm-eval's own tasks (mmlu, arc_challenge, ...) need --hub true"))
    model, tok = load_model(ckpt, device, dtype, tokenizer, spike)
    model_lm = lm_class()(model, tok, batch_size=batch_size, max_length=max_length, prefill_chunk=prefill_chunk,
                          max_gen_toks=max_gen_toks)
    try:
        res = lm_eval.simple_evaluate(model=model_lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=out is not None, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except ConnectionError as e:
        raise ConnectionError(f"{e}: a task's data is not on this machine: --hub true downloads it (into the Hugging "
                              f"Face cache), or point a local task at files with dataset_kwargs.data_files") from None
    print(f"{ckpt}{f' (spike k={spike:g})' if spike else ''}: {', '.join(tasks)}"
          f"{f', limit {limit:g}' if limit else ''}")
    print(make_table(res))
    if res.get("groups"):
        print(make_table(res, "groups"))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(res, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        print(f"wrote {os.path.join(out, 'results.json')}")


def recall(*, ckpt: str, lengths: list[int] | None = None, depths: list[float] = [0, 25, 50, 75, 100],
           samples: int = 10, tasks: list[str] = list(RECALL_TASKS), seed: int = 0, n_keys: int = 4,
           n_queries: int = 4, out: str | None = None, prefill_chunk: int = 4096, spike: float | None = None,
           device: str = DEFAULT_DEVICE, dtype: convert.DType | None = None, tokenizer: str | None = None) -> None:
    """Long-context recall: accuracy of greedy answers per task, context length and needle depth.

    Args:
        ckpt: checkpoint directory: ours (float, W8ASpike or FP8) or a released SpikingBrain-7B directory
        lengths: context lengths in tokens, prompt and answer (default: 1024, 2048, ... up to config.max_seq_len,
            at most 32768)
        depths: needle depths in % of the context (0: right after the instructions, 100: right before the question)
        samples: prompts per cell
        tasks: passkey, multikey, mqar
        seed: the prompts are a function of the seed, task, length, depth and sample index
        n_keys: multikey: needles in the context, one of them asked for
        n_queries: mqar: pairs asked for at once
        out: directory for recall.json and recall-TASK.png heatmaps
        prefill_chunk: prompt tokens per forward
        spike: spiking activations with threshold mean|x| / spike
        device: cuda or cpu
        dtype: default bfloat16 on CUDA, float32 on CPU
        tokenizer: tokenizer directory, if not the checkpoint's
    """
    bad = [t for t in tasks if t not in RECALL_TASKS]
    if bad or not tasks:
        raise ValueError(f"recall tasks {tasks}: choose from {list(RECALL_TASKS)}")
    if samples < 1 or n_keys < 1 or n_queries < 1 or prefill_chunk < 1:
        raise ValueError("need samples >= 1, n_keys >= 1, n_queries >= 1 and prefill_chunk >= 1")
    if not depths or any(not 0 <= dp <= 100 for dp in depths):
        raise ValueError(f"depths {depths} must lie in 0..100 (% of the context)")
    model, tok = load_model(ckpt, device, dtype, tokenizer, spike)
    limit = model.config.max_seq_len
    lengths = lengths or [L for L in (1024 << i for i in range(6)) if L <= limit] or [limit]
    if max(lengths) > limit:
        raise ValueError(f"length {max(lengths)} is longer than {model.config.name}'s limit config.max_seq_len="
                         f"{limit}: give --lengths up to it")
    grid = recall_grid(greedy_answer(model, tok, prefill_chunk), tok, tasks, lengths, depths, samples, seed, n_keys,
                       n_queries)
    print(f"{ckpt}{f' (spike k={spike:g})' if spike else ''}: recall accuracy %, greedy answers, seed {seed}")
    print(format_grid(grid, lengths, depths, samples))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "recall.json"), "w") as f:
            json.dump(dict(ckpt=ckpt, spike=spike, seed=seed, samples=samples, n_keys=n_keys, n_queries=n_queries,
                           lengths=lengths, depths=depths, accuracy=grid), f, indent=2)
        for t, acc in grid.items():
            write_png(os.path.join(out, f"recall-{t}.png"), heatmap(acc, lengths, depths))
        print(f"wrote {out}/recall.json and {', '.join(f'recall-{t}.png' for t in grid)}")


def recall_data(*, tokenizer: str, out: str, n: int = 20000, lengths: list[int] = [256, 384, 512],
                tasks: list[str] = list(RECALL_TASKS), seed: int = 1, n_keys: int = 4, n_queries: int = 4) -> None:
    """Recall documents to train on: a .jsonl of {"text": prompt + answer} that `train.py prepare` reads. Each
    document draws its task, length and depth (uniform in 0..100); keep the seed apart from recall's (default 0) so
    that no evaluated prompt was seen in training.

    Args:
        tokenizer: tokenizer directory (lengths are in its tokens)
        out: the .jsonl file to write
        n: documents
        lengths: document lengths in tokens to draw from (short against train.seq_len: packing cuts documents at row
            edges, and a cut one loses its answer)
        tasks: passkey, multikey, mqar
        seed: the documents are a function of it
        n_keys: multikey: needles per document
        n_queries: mqar: pairs asked for at once
    """
    import tokenizer as tokenizers
    bad = [t for t in tasks if t not in RECALL_TASKS]
    if bad or not tasks or n < 1 or not lengths:
        raise ValueError(f"need tasks from {list(RECALL_TASKS)} (got {tasks}), n >= 1 and some lengths")
    tok = tokenizers.open_tokenizer(tokenizer)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer in {tokenizer} (tokenizer.tiktoken + tokenizer.json, or Hugging Face "
                                f"vocab.json + merges.txt)")
    rng, tmp = random.Random(f"recall_data/{seed}"), out + ".tmp"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(tmp, "w") as f:
        for i in tqdm(range(n), desc="recall documents"):
            s = recall_sample(tok, rng.choice(tasks), rng.choice(lengths), rng.uniform(0, 100), seed, i, n_keys,
                              n_queries)
            f.write(json.dumps({"text": s["prompt"] + s["answer"]}) + "\n")
    os.replace(tmp, out)   # complete or absent: train.py prepare never reads half a file
    print(f"wrote {out}: {n} recall documents of {lengths} tokens ({', '.join(tasks)})")


# ----------------------------------------------------------------------------- conversion: a recipe's loss curves

# the rest of the alphabet for the conversion plot's legend (3 x 5 pixels, each row an octal digit)
GLYPHS.update({c: [int(b) for b in f"{int(o, 8):015b}"] for c, o in zip(
    "abcdefghijlmnopqrstuvwxyz.-+/ ", "25755 65656 34443 65556 74647 74644 34553 55755 72227 11152 44447 57755 65555 "
    "25552 65644 25563 65655 34216 72222 55557 55552 55775 55255 55222 71247 00002 00700 02720 11244 00000".split())
    if c not in GLYPHS})
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]   # matplotlib's tab10


def scalars(log_dir, tag):
    """{step: value} of a TensorBoard tag over a run's logs/version_*, in version order (a resumed run's later
    version wins a step both logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = [d for d in os.listdir(log_dir) if re.fullmatch(r"version_\d+", d)] if os.path.isdir(log_dir) else []
    got = {}
    for d in sorted(versions, key=lambda d: int(d[8:])):
        ea = EventAccumulator(os.path.join(log_dir, d), size_guidance={"scalars": 0})   # 0: every point, unsampled
        ea.Reload()
        if tag in ea.Tags()["scalars"]:
            got.update({e.step: e.value for e in ea.Scalars(tag)})
    return got


def layout_words(c):
    """A Config's mixers, MoE and spiking in a few words: 'fa', 'gla/swa', 'la+swa/la+fa MoE', ..."""
    return "/".join(dict.fromkeys(c.layout)) + (" MoE" if c.moe_layers else "") + \
        (f" spike_k={c.spike_k:g}" if c.spike_k else "")


def read_run(path):
    """A train.py out_dir -> {"curve": [(tokens, validation loss)], "layout": words}: val/loss per step, tokens per
    step from perf/tokens_seen (step x global batch x seq_len), the layout from final/config.yaml."""
    logs = os.path.join(path, "logs")
    val, seen = scalars(logs, "val/loss"), scalars(logs, "perf/tokens_seen")
    if not val or not seen:
        raise ValueError(f"{logs} holds no val/loss or no perf/tokens_seen: a train.py run logs them every "
                         f"eval.interval and train.log_interval steps")
    step, n = next(iter(seen.items()))
    cfg = os.path.join(path, "final", "config.yaml")
    return dict(curve=[(s * round(n / step), v) for s, v in sorted(val.items())],
                layout=layout_words(convert.load_config(cfg)) if os.path.isfile(cfg) else "?")


def conversion_table(runs, dense="dense", margin=0.05):
    """One row per run of `runs` ({name: read_run's dict}), the dense run first: its tokens, last validation loss,
    that minus the dense run's last, and the tokens after which its validation loss first came within `margin` nats
    of the dense run's last (None: never); tokens also as a fraction of the dense run's."""
    if dense not in runs:
        raise ValueError(f"no run named {dense!r} among {sorted(runs)}: pass --dense NAME")
    ref_tokens, ref = runs[dense]["curve"][-1]
    rows = []
    for name in [dense] + sorted(set(runs) - {dense}):
        tokens, loss = runs[name]["curve"][-1]
        within = next((t for t, v in runs[name]["curve"] if v <= ref + margin), None)
        rows.append(dict(run=name, layout=runs[name]["layout"], tokens=tokens, fraction=tokens / ref_tokens,
                         loss=loss, delta=loss - ref, within=within,
                         within_fraction=None if within is None else within / ref_tokens))
    return rows


def overfit_note(runs, dense="dense", margin=0.05):
    """A warning when the dense run's last validation loss lies more than `margin` above its best (None otherwise):
    it overfit, and runs compared with its last loss look better than they are."""
    curve = runs[dense]["curve"]
    best_tokens, best = min(curve, key=lambda p: p[1])
    last = curve[-1][1]
    if last - best <= margin:
        return None
    return (f"note: the dense run {dense!r} overfit: its last validation loss {last:.4f} is {last - best:.4f} above "
            f"its best, {best:.4f} after {_tokens(best_tokens)} tokens, so the runs compared with its last loss look "
            f"better than they are; train it on fewer tokens or more data")


def _tokens(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 \
        else str(n)


def format_conversion(rows, margin=0.05):
    """conversion_table's rows as a Markdown table."""
    lines = [f"| run | layout | tokens | of dense | val loss | vs dense | within {margin:g} nats after |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        within = "never" if r["within"] is None else f"{_tokens(r['within'])} ({r['within_fraction']:.1%})"
        lines.append(f"| {r['run']} | {r['layout']} | {_tokens(r['tokens'])} | {r['fraction']:.1%} | "
                     f"{r['loss']:.4f} | {r['delta']:+.4f} | {within} |")
    return "\n".join(lines)


def _label(s):
    return "".join(c if c in GLYPHS else c.lower() if c.lower() in GLYPHS else " " for c in s)


def loss_plot(runs, dense="dense", margin=0.05, size=(720, 420)):
    """Validation loss against tokens (log scale) of every run -> an RGB image [H, W, 3] uint8: the dense run black,
    the others in PALETTE's colours in name order, a dot per validation, a legend on the right, and a dotted line
    `margin` above the dense run's last loss."""
    W, H = size
    left, right, top, bottom = 44, 150, 16, 34
    names = [dense] + sorted(set(runs) - {dense})
    pts = [p for n in names for p in runs[n]["curve"] if p[0] > 0]
    x0 = math.floor(math.log10(min(t for t, _ in pts)))
    x1 = max(x0 + 1, math.ceil(math.log10(max(t for t, _ in pts))))
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    step = next((s for s in (0.05, 0.1, 0.2, 0.5, 1, 2, 5) if hi - lo <= 8 * s), 10)
    y0, y1 = math.floor(lo / step) * step, max(math.floor(lo / step) + 1, math.ceil(hi / step)) * step

    def px(t, v):
        return (round(left + (math.log10(t) - x0) / (x1 - x0) * (W - left - right)),
                round(top + (y1 - v) / (y1 - y0) * (H - top - bottom)))
    img = np.full((H, W, 3), 255, np.uint8)
    for e in range(x0, x1 + 1):   # a grid line and a label per decade of tokens
        x = px(10 ** e, y0)[0]
        img[top:H - bottom, x] = 220
        _draw(img, x - 6, H - bottom + 6, _label(f"{10 ** (e % 3)}{['', 'k', 'M', 'B'][min(e // 3, 3)]}"))
    for i in range(round((y1 - y0) / step) + 1):
        y = px(10 ** x0, y0 + i * step)[1]
        img[y, left:W - right] = 220
        _draw(img, 2, y - 5, f"{y0 + i * step:.{2 if step < 0.1 else 1}f}")
    _draw(img, W - right - 48, H - 12, "tokens")
    _draw(img, left + 4, 3, "val loss")
    y = px(10 ** x0, runs[dense]["curve"][-1][1] + margin)[1]
    if top <= y < H - bottom:
        img[y, left:W - right:4] = 120
    for n, name in enumerate(names):
        color = (0, 0, 0) if name == dense else PALETTE[(n - 1) % len(PALETTE)]
        xy = [px(t, v) for t, v in runs[name]["curve"] if t > 0]
        for (xa, ya), (xb, yb) in zip(xy, xy[1:]):   # 2-pixel segments between validations
            k = np.linspace(0, 1, max(abs(xb - xa), abs(yb - ya)) + 2)
            xs, ys = np.rint(xa + k * (xb - xa)).astype(int), np.rint(ya + k * (yb - ya)).astype(int)
            img[ys, xs] = img[ys + 1, xs] = img[ys, xs + 1] = color
        for x, y in xy:
            img[y - 1:y + 2, x - 1:x + 2] = color
        img[top + 14 * n + 4:top + 14 * n + 6, W - right + 8:W - right + 24] = color
        _draw(img, W - right + 30, top + 14 * n, _label(name))
    img[top:H - bottom + 1, left] = img[H - bottom, left:W - right] = 0   # axes
    return img


def conversion(*, runs: str, dense: str = "dense", margin: float = 0.05, out: str | None = None) -> None:
    """Validation loss against tokens of a recipe's runs, against a dense reference run: a table, a CSV, a plot.

    Every train.py run under --runs with its tokens and last validation loss against the dense run's, and the
    tokens after which it first came within --margin nats of it (README: "Reproduce the conversion claim on one
    GPU"), and a note if the dense run overfit (its last loss more than --margin above its best); with --out, the
    table (conversion.md), every validation point (conversion.csv) and validation loss
    against tokens (conversion.png).

    Args:
        runs: directory whose subdirectories holding logs/ are train.py out_dirs
        dense: the dense run's directory name: the reference
        margin: nats above the dense run's last validation loss that count as recovered
        out: directory for conversion.md, conversion.csv and conversion.png
    """
    import csv

    names = sorted(d for d in os.listdir(runs) if os.path.isdir(os.path.join(runs, d, "logs"))) \
        if os.path.isdir(runs) else []
    if not names:
        raise FileNotFoundError(f"{runs} holds no train.py runs (directories with logs/)")
    curves = {n: read_run(os.path.join(runs, n)) for n in names}
    table = format_conversion(conversion_table(curves, dense, margin), margin)
    note = overfit_note(curves, dense, margin)
    table += f"\n\n{note}" if note else ""
    print(table)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "conversion.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, "conversion.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "layout", "tokens", "val_loss"])
            w.writerows([n, c["layout"], t, f"{v:.6f}"] for n, c in curves.items() for t, v in c["curve"])
        write_png(os.path.join(out, "conversion.png"), loss_plot(curves, dense, margin))
        print(f"wrote {out}/conversion.md, conversion.csv and conversion.png")


if __name__ == "__main__":
    from jsonargparse import CLI

    try:
        CLI({"lm": lm, "recall": recall, "recall_data": recall_data, "spikes": spikes, "conversion": conversion})
    except (ValueError, OSError, ModuleNotFoundError) as e:   # bad input or a missing extra: the message says what
        sys.exit(f"error: {e}")                                    # and how to fix it, a traceback adds nothing

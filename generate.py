"""Talk to a model: a streaming ChatML chat, or one-shot completion of a prompt.

    python generate.py --ckpt out/ckpt                          # chat: /reset clears the history, /quit leaves,
                                                                #       Ctrl-C stops a reply (the session goes on)
    python generate.py --ckpt out/ckpt --prompt "Once upon a"   # one-shot completion of raw text
    cat book.txt | python generate.py --ckpt out/ckpt --prompt - --max_new_tokens 200   # prompt from stdin
    python generate.py --ckpt V1-7B-base --compile true         # a released SpikingBrain-7B directory, compiled
    python generate.py --ckpt out/ckpt --spike 3                # spiking activations; prints their sparsity
    python generate.py --ckpt out/ckpt --quant int8             # INT8 weights: decode reads half the bytes
    python generate.py --ckpt out/ckpt --spike 3 --quant fp8    # e4m3 weights, spike counts on FP8 tensor cores
    python generate.py --ckpt out/ckpt-fp8                      # the same from an FP8 checkpoint (convert.py fp8)
    python generate.py --ckpt out/ckpt --device cpu             # CPU (float32)
    cat book.txt | python generate.py --ckpt out/ckpt --prompt - --cp 2   # the prompt's prefill split over 2 GPUs

After every reply it prints (on stderr) time to first token, prefill and decode speed and cache memory.
A prompt is prefilled in chunks of --prefill_chunk tokens, so a million-token prompt needs only one chunk's
activations. The cache of a GLA/SWA model has a fixed size whatever the context (GLA state + SWA ring);
full-attention layers keep every key and grow as the conversation does. The chat keeps the conversation in
the cache between turns: each turn prefills only its new tokens.
--cp N (one-shot only) splits the prompt's prefill over N processes (kernels.cp_launch: one GPU each, or gloo
processes on a CPU), in rounds of N x --prefill_chunk tokens: each process prefills its contiguous slice of a round,
then all take the last one's cache, which holds the prompt so far. The last one then samples and decodes the reply
alone.
"""
import codecs
import contextlib
import signal
import sys
import threading
import time
from typing import Literal

import torch

import convert
import kernels
import spiking
from model import check_spike_k, penalize, sample

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- sampling

# ----------------------------------------------------------------------------- the cache

@torch.no_grad()
def prefill(model, cache, ids, chunk, stop=()):
    """Feed ids [B, T] into the cache, `chunk` positions per call. Returns the last position's logits [B, V],
    or None when `stop` turns true between two chunks (the cache then holds the chunks fed so far)."""
    for a in range(0, ids.shape[1], chunk):
        if stop:
            return None
        logits = model(ids[:, a:a + chunk], cache=cache, last_only=True)[0]
    return logits[:, -1]


def has_full_attention(config):
    return any("fa" in config.mixers(i) for i in range(config.n_layer))


def grown(model, cache, max_len):
    """A copy of `cache` with room for max_len positions. Every buffer keeps its slots: a buffer that grows had
    room for every position so far (it never wrapped), so its slots are a prefix of the new one's."""
    new = model.new_cache(next(cache.buffers()).shape[0], max_len)      # the first buffer (state or keys) is [B, ...]
    for a, b in zip(new.buffers(), cache.buffers()):
        a[tuple(slice(0, n) for n in b.shape)].copy_(b)
    new.seen = cache.seen
    return new


# ----------------------------------------------------------------------------- streaming and Ctrl-C

class TextStream:
    """Token ids -> text on `out` as soon as whole UTF-8 characters are there (a token may end inside one)."""

    def __init__(self, tokenizer, out):
        self.tok, self.out = tokenizer, out
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def put(self, i):
        self.out.write(self.dec.decode(self.tok.decode_bytes([i])))
        self.out.flush()

    def end(self):
        self.out.write(self.dec.decode(b"", final=True))
        self.out.flush()


@contextlib.contextmanager
def stop_on_ctrl_c():
    """Within: the first Ctrl-C only sets the yielded flag, so the reply ends after the current token or prefill
    chunk and the cache stays consistent; a second one interrupts as usual. (Only the main thread gets signals.)"""
    hit, main = [], threading.current_thread() is threading.main_thread()

    def handler(sig, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(True)
    old = signal.signal(signal.SIGINT, handler) if main else None
    try:
        yield hit
    finally:
        if main:
            signal.signal(signal.SIGINT, old)


# ----------------------------------------------------------------------------- generation

class Generator:
    """A model, its tokenizer and one sequence held in a cache. `extend(ids)` appends tokens and generates the
    continuation; the sequence (prompt + replies) stays in the cache for the next call."""

    def __init__(self, model, tokenizer, *, max_new_tokens=512, temperature=1.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, stop=None, prefill_chunk=32768, compile=False, spike_stats=False,
                 err=None, cp_group=None):
        self.model, self.tok, self.config, self.err = model, tokenizer, model.config, err or sys.stderr
        self.max_new_tokens, self.prefill_chunk = max_new_tokens, prefill_chunk
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.penalty = repetition_penalty
        self.stop = set(stop_ids(tokenizer, stop))
        self.spike_stats, self.compiled = spike_stats, compile
        self.cp_group = cp_group   # the first prompt is prefilled split over its ranks (kernels.cp_prefill)
        self.device = model.lm_head.weight.device
        self.step = model.forward   # a decode step: one token per row at positions given as a tensor
        self.reset()
        if compile:
            kernels.compile_blocks(model)
            self.step = kernels.compile_decode(model.forward, self.device)
            self.warm_up()

    def warm_up(self):
        """Compile the prefill and the decode step now rather than inside the first reply, on a cache of the size
        replies use (exactly so for GLA/SWA models; a full-attention cache grows, and a new size compiles once
        more). Two prompt lengths: the second compiles the prefill for any length; on CUDA two more past 128
        tokens, where sliding-window prefill moves to flex_attention (kernels.use_flex)."""
        t0 = time.perf_counter()
        lengths = (5, 6, 129, 130) if self.device.type == "cuda" else (5, 6)
        self.room(lengths[-1])
        tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for n in lengths:
                self.model(tok.expand(1, n), cache=self.model.new_cache(1, self.cache_len), last_only=True)
            for _ in range(3):      # CUDA graph trees: a warm-up run, a recording, a replay
                torch.compiler.cudagraph_mark_step_begin()
                self.step(tok, cache=self.cache, input_pos=torch.zeros(1, 1, dtype=torch.long, device=self.device),
                          last_only=True)
        self.reset()
        print(f"compiled the prefill and the decode step in {time.perf_counter() - t0:.1f} s", file=self.err,
              flush=True)

    def reset(self):
        self.ids, self.cache, self.cache_len = [], None, 0   # the cache holds all of ids but the pending tail

    @property
    def fed(self):
        return 0 if self.cache is None or self.cache.seen == 0 else self.cache.seen - self.config.n_sink

    def room(self, n):
        """Make the cache hold n positions. A GLA/SWA cache has one size for any length beyond the window, so it
        is allocated for config.max_seq_len at once; a full-attention cache doubles when it must grow."""
        c = self.config
        need, top = n, c.max_seq_len                           # tokens; the sinks' slots come on top
        if self.cache is not None and self.cache_len >= need:
            return
        if not has_full_attention(c):
            size = top
        else:
            size = need if self.cache is None else min(max(need, 2 * self.cache_len), top)
        self.cache = self.model.new_cache(1, size) if self.cache is None else grown(self.model, self.cache, size)
        self.cache_len = size
        if self.compiled:
            kernels.static_cache(self.cache)

    def feed_split(self, new_ids):
        """A rank of cp_group other than the last: its part of the last rank's extend(new_ids), the split prefill,
        into a cache of the size the last rank's has (the ranks exchange caches between rounds)."""
        self.check_room(len(new_ids))
        self.ids += new_ids
        self.room(len(self.ids) + min(self.max_new_tokens, self.config.max_seq_len - len(self.ids)))
        with torch.no_grad():
            kernels.cp_prefill(self.model, self.cache, torch.tensor([new_ids], device=self.device), self.cp_group,
                               self.prefill_chunk)

    def check_room(self, n_new, hint=""):
        """The sequence plus n_new tokens and at least one reply token must fit in config.max_seq_len."""
        check_length(self.config, len(self.ids) + n_new, hint)

    @torch.no_grad()
    def extend(self, new_ids, out):
        """Append new_ids to the sequence and stream the reply's text to `out`. Returns the reply's ids (a stop
        token ends the reply and is not part of it) and a stats dict."""
        if not new_ids and self.fed == len(self.ids):
            raise ValueError("empty prompt: give at least one token of text")
        self.check_room(len(new_ids))
        self.ids += new_ids
        n_new = min(self.max_new_tokens, self.config.max_seq_len - len(self.ids))
        reply, stream, steps, dev = [], TextStream(self.tok, out), 0, self.device
        with stop_on_ctrl_c() as interrupted, contextlib.ExitStack() as hooks:
            st = None
            if self.spike_stats:
                st = hooks.enter_context(spiking.collect_stats(self.model))
            t0 = time.perf_counter()
            self.room(len(self.ids) + n_new)
            fed = self.fed
            ids = torch.tensor([self.ids[fed:]], device=dev)
            if self.cp_group is None:
                logits = prefill(self.model, self.cache, ids, self.prefill_chunk, stop=interrupted)
            else:   # the other ranks run kernels.cp_prefill beside it (feed_split)
                logits = kernels.cp_prefill(self.model, self.cache, ids, self.cp_group, self.prefill_chunk)
            n_prefill = self.fed - fed
            if self.penalty != 1.0:
                seen = torch.zeros(1, self.config.vocab_size, dtype=torch.bool, device=dev)
                seen[0, torch.tensor(self.ids, device=dev)] = True
            t_first = None
            while not interrupted:
                if self.penalty != 1.0:
                    logits = penalize(logits, seen, self.penalty)
                tok = sample(logits[:, :self.tok.n_vocab], **self.sampling)   # never a padded-vocab id
                t = tok.item()
                if t_first is None:
                    t_first = time.perf_counter()
                    if self.compiled:   # statistics hooks would break the compiled step's graph
                        hooks.close()
                if t in self.stop:
                    break
                reply.append(t)
                self.ids.append(t)
                stream.put(t)
                if len(reply) == n_new:
                    break
                if self.penalty != 1.0:
                    seen[0, t] = True
                if self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                pos = torch.full((1, 1), self.cache.seen, device=dev)
                logits = self.step(tok, cache=self.cache, input_pos=pos, last_only=True)[0][:, -1]
                self.cache.seen += 1
                steps += 1
            stream.end()
            t_end = time.perf_counter()
        t_first = t_first or t_end
        stats = dict(ttft=t_first - t0, prefill_tokens=n_prefill, decode_steps=steps, decode_s=t_end - t_first,
                     cache_bytes=self.cache.nbytes(), stopped=bool(interrupted),
                     cut=len(reply) == n_new < self.max_new_tokens)
        if st is not None and st.per_layer:
            stats["spikes"] = st.summary()
        return reply, stats

    def report(self, s):
        """One line on stderr: TTFT, prefill and decode speed, cache memory (and spike statistics)."""
        line = (f"[TTFT {s['ttft']:.3f} s | prefill {s['prefill_tokens']} tok, {s['prefill_tokens'] / s['ttft']:.0f} "
                f"tok/s | decode {s['decode_steps']} tok, {s['decode_steps'] / max(s['decode_s'], 1e-9):.1f} tok/s | "
                f"cache {s['cache_bytes'] / 2**20:.2f} MiB")
        if self.device.type == "cuda":
            line += f" | peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        line = ("[stopped] " if s["stopped"] else "") + line + "]"
        if s["cut"]:
            line += f" (reply cut at config.max_seq_len={self.config.max_seq_len})"
        if "spikes" in s:
            m = s["spikes"]
            line += (f"\n[spikes{' (prefill only: the decode step is compiled)' if self.compiled else ''}: "
                     f"sparsity {100 * m['sparsity']:.1f}% over a 3-step window, {100 * m['silent']:.1f}% zero "
                     f"counts, {m['spikes_per_channel']:.2f} spikes per channel and token]")
        print(line, file=self.err, flush=True)


def check_length(config, total, hint=""):
    """A sequence of `total` tokens leaves room for at least one reply token within config.max_seq_len."""
    if total >= config.max_seq_len:
        raise ValueError(f"the prompt makes the sequence {total} tokens long; {config.name} takes at most "
                         f"{config.max_seq_len} tokens of prompt and reply together (config.max_seq_len){hint}")


def stop_ids(tokenizer, stop):
    """Stop strings -> token ids. Default: <|endoftext|> and <|im_end|> (when the tokenizer has them)."""
    if stop is None:
        return [tokenizer.special_tokens[s] for s in ("<|endoftext|>", "<|im_end|>") if s in tokenizer.special_tokens]
    ids = []
    for s in stop:
        i = tokenizer.special_tokens.get(s)
        if i is None:
            enc = tokenizer.encode(s)
            if len(enc) != 1:
                raise ValueError(f"stop {s!r} is {len(enc)} tokens; a stop must be one token (or a special token)")
            i = enc[0]
        ids.append(i)
    return ids


class Chat:
    """A ChatML conversation on a Generator: each turn adds the user message and the assistant's reply."""

    def __init__(self, gen, system=None):
        self.gen, self.system = gen, system
        sp = gen.tok.special_tokens
        if "<|im_start|>" not in sp or "<|im_end|>" not in sp:
            raise ValueError("this tokenizer has no <|im_start|>/<|im_end|> tokens, so it cannot chat: use --prompt")
        self.close = [sp["<|im_end|>"]] + gen.tok.encode("\n")
        self.reset()

    def reset(self):
        self.gen.reset()
        if self.system:
            self.gen.ids = self.gen.tok.encode_chat([dict(role="system", content=self.system)])[0]

    def turn(self, text, out):
        ids = self.gen.tok.encode_chat([dict(role="user", content=text)], add_generation_prompt=True)[0]
        self.gen.check_room(len(ids), hint=": /reset starts a new conversation")
        try:
            return self.gen.extend(ids, out)
        finally:    # the reply ends with <|im_end|>\n whatever ended it, even a second Ctrl-C; fed next turn
            self.gen.ids += self.close


def repl(chat):
    out, err = sys.stdout, sys.stderr
    print("chat: /reset clears the history, /quit or Ctrl-D leaves, Ctrl-C stops a reply", file=err, flush=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            break
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D leaves)", file=err, flush=True)
            continue
        text = line.strip()
        if text == "/quit":
            break
        if text == "/reset":
            chat.reset()
            print("(history cleared)", file=err, flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}: /reset or /quit", file=err, flush=True)
            continue
        if not text:
            continue
        try:
            _, stats = chat.turn(text, out)
        except ValueError as e:
            print(f"error: {e}", file=err, flush=True)
            continue
        except KeyboardInterrupt:   # a second Ctrl-C inside a forward: the cache may be half-written
            chat.gen.cache = None   # so the whole conversation is prefilled again next turn
            print("\n(interrupted)", file=err, flush=True)
            continue
        out.write("\n")
        chat.gen.report(stats)


def load(ckpt, tokenizer, device, dt, spike, quant, say=True):
    """The checkpoint's model (spiking activations, quantized weights as asked) and tokenizer; `say`: print what was
    loaded on stderr."""
    t0 = time.perf_counter()
    model, tok = convert.load(ckpt, device, dt, tokenizer)
    if spike is not None:
        model.set_spike_k(spike)
    if say:
        print(f"loaded {ckpt} ({model.config.name}, {model.num_params() / 1e6:,.1f}M parameters, {dt}, {device}) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if quant == "int8":   # after the count above: the INT8 layers hold buffers, not parameters
        spiking.quantize_int8(model, group_size=128)   # refuses a W8ASpike or FP8 checkpoint, naming it
    elif quant == "fp8" and spiking.quantized_format(model) != "FP8":   # an FP8 checkpoint is FP8 already
        spiking.replace_linears_fp8(model, k=model.config.spike_k)   # FP8 multiplies spike counts: the model's k
    return model, tok


def split_one_shot(group, device, ids, ckpt, tokenizer, dt, spike, quant, seed, options):
    """One process of main(cp=N) (kernels.cp_launch): load the checkpoint, prefill this rank's slice of the prompt
    ids (kernels.cp_prefill); the last rank then samples and decodes as one process does (Generator.extend, its cache
    holding the whole prompt), printing the reply and the statistics line. The others end after the prefill."""
    rank, last = torch.distributed.get_rank(group), torch.distributed.get_world_size(group) - 1
    if seed is not None:   # before loading, as in one process: the same random stream reaches the sampler
        torch.manual_seed(seed)
    model, tok = load(ckpt, tokenizer, device, dt, spike, quant, say=rank == last)
    gen = Generator(model, tok, **options, spike_stats=model.config.spike_k is not None, cp_group=group)
    gen.check_room(len(ids))   # every rank refuses alike, before any collective
    torch.distributed.barrier(group)   # the time to first token counts the split prefill, not the ranks' loading
    if rank < last:
        gen.feed_split(ids)
        return
    _, stats = gen.extend(ids, sys.stdout)
    sys.stdout.write("\n")
    gen.report(stats)


def main(*, ckpt: str, prompt: str | None = None, system: str | None = None, tokenizer: str | None = None,
         max_new_tokens: int = 512, temperature: float = 0.7, top_k: int | None = 20, top_p: float | None = 0.8,
         repetition_penalty: float = 1.05, seed: int | None = None, stop: list[str] | None = None,
         prefill_chunk: int = 32768, compile: bool = False, spike: float | None = None,
         quant: Literal["int8", "fp8"] | None = None, device: str = DEFAULT_DEVICE, dtype: str | None = None,
         cp: int = 1) -> None:
    """Chat with a checkpoint (no --prompt) or complete one prompt. Sampling defaults are Qwen2.5-Instruct's.

    Args:
        ckpt: checkpoint directory: ours (config.yaml + safetensors, float, W8ASpike or FP8) or a released
            SpikingBrain-7B Hugging Face directory (config.json).
        prompt: one-shot: complete this raw text (special-token strings become their ids); "-" reads stdin.
        system: chat: the system message.
        tokenizer: tokenizer directory, when the checkpoint has none.
        max_new_tokens: longest reply.
        temperature: 0 is greedy.
        top_k: sample among the k most likely tokens (None: all).
        top_p: nucleus sampling: the most likely tokens up to this mass (None or 1: all).
        repetition_penalty: > 1 discourages tokens already in the conversation (1: off).
        seed: random seed for sampling (None: random).
        stop: stop tokens (default <|endoftext|>, <|im_end|>).
        prefill_chunk: prompt tokens per forward pass while prefilling (with cp: per process and round).
        compile: torch.compile the blocks for prefill and the decode step (CUDA graphs on GPU).
        spike: spiking activations with threshold mean|x| / spike; prints their sparsity.
        quant: int8: INT8 weights (groups of 128 input channels) for every projection of a float checkpoint,
            activations kept; decode steps on CUDA read the 8-bit weights (kernels.int8_gemv). fp8: e4m3 weights
            per output channel, spike counts taken as e4m3 (spiking.replace_linears_fp8; needs spiking activations:
            --spike or a spiking checkpoint); on CUDA decode steps read the e4m3 weights (kernels.fp8_gemv) and
            longer inputs run torch._scaled_mm (capability >= 8.9). An FP8 checkpoint (convert.py fp8) runs so
            without --quant: fp8 leaves it as it is, and int8 refuses it (as it refuses a W8ASpike one: INT8 weights
            are made from float ones).
        device: cuda or cpu.
        dtype: weights and activations (default bfloat16 on CUDA, float32 on CPU).
        cp: one-shot: split the prompt's prefill over this many processes (context parallelism; on CUDA one GPU
            each, cuda:0 to cuda:cp-1, NCCL; on a CPU gloo processes sharing its cores). Each loads the checkpoint;
            the prompt goes in rounds of about cp x prefill_chunk tokens, each process prefilling its contiguous
            slice of a round in one forward, all then taking the last one's cache (the prompt so far). The last
            one samples and decodes the reply alone. The prompt needs at least cp tokens. Spiking sparsity
            (--spike) then counts the last rank's slices and the reply.
    """
    if temperature < 0 or max_new_tokens < 1 or prefill_chunk < 1 or repetition_penalty <= 0:
        raise ValueError("need temperature >= 0, max_new_tokens >= 1, prefill_chunk >= 1, repetition_penalty > 0")
    if (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need top_k >= 1 and 0 < top_p <= 1; got top_k={top_k}, top_p={top_p}")
    check_spike_k(spike, "spike")
    if quant not in (None, "int8", "fp8"):
        raise ValueError(f"quant={quant!r}: choose int8 or fp8")
    if cp < 1:
        raise ValueError(f"cp={cp}: need at least 1 process")
    if cp > 1 and prompt is None:
        raise ValueError(f"--cp {cp} splits one prompt's prefill: give --prompt TEXT (or --prompt - to read stdin), "
                         "or drop --cp to chat (the chat runs in one process)")
    if cp > 1 and compile:
        raise ValueError(f"--cp {cp} runs the eager model: drop --compile")
    kernels.cp_check_devices(cp, device)
    dt = convert.resolve_dtype(dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if prompt == "-":
        prompt = sys.stdin.read()
    if prompt is not None and not prompt:
        raise ValueError("empty prompt: give at least one token of text")
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, stop=stop, prefill_chunk=prefill_chunk, compile=compile)
    if cp > 1:
        ids = convert.load_tokenizer(ckpt, tokenizer).encode(prompt, specials=True)
        if len(ids) < cp:
            raise ValueError(f"the prompt is {len(ids)} tokens: --cp {cp} splits it into {cp} slices of at least one "
                             f"token; give a longer prompt or --cp {len(ids)} or fewer")
        check_length(convert.read_config(ckpt), len(ids))   # before N processes load the weights
        kernels.cp_launch(split_one_shot, cp, device, ids, ckpt, tokenizer, dt, spike, quant, seed, options)
        return
    if seed is not None:
        torch.manual_seed(seed)
    model, tok = load(ckpt, tokenizer, device, dt, spike, quant)
    gen = Generator(model, tok, **options, spike_stats=model.config.spike_k is not None)
    if prompt is None:
        repl(Chat(gen, system))
        return
    _, stats = gen.extend(tok.encode(prompt, specials=True), sys.stdout)
    sys.stdout.write("\n")
    gen.report(stats)


if __name__ == "__main__":
    from jsonargparse import CLI
    try:
        CLI(main, as_positional=False)
    except (ValueError, OSError) as e:   # bad input: the message says what and where, a traceback adds nothing
        sys.exit(f"error: {e}")

"""An OpenAI-compatible server on LitServe: the conversations in flight are decoded together, a batched step at a time.

    pip install -e ".[serve]"
    python serve.py --ckpt out/tiny/final                                  # http://127.0.0.1:8000/v1, CPU
    python serve.py --ckpt V1-7B-base --max_batch 32 --compile true        # a released SpikingBrain-7B on a GPU

POST /v1/chat/completions (ChatML) and /v1/completions (raw text), streaming or not; GET /v1/models and /health.
Sampling: temperature (0 is greedy), top_p, max_tokens, stop (strings), seed, presence_penalty and frequency_penalty
(OpenAI's, over the reply), repetition_penalty (generate.py's, over prompt and reply; an extra field, named as vLLM
names it), ignore_eos (vLLM's too: stop tokens do not end the reply, which runs to max_tokens: benchmarks ask for exact
lengths). The model name clients send is checked against the one served (GET /v1/models).

How it runs. LitServe forks an HTTP process (`Spec`) and spawns an inference worker (`Loop` driving an `Engine`). The
HTTP process checks a request, answers a bad one at once with an OpenAI-style 4xx error, and queues a good one's token
ids. The worker holds max_batch rows of one batched cache. Between two decode steps it takes whatever has arrived: the
first waiting conversation is prefilled alone into a batch-1 cache and copied into a free row, so the rows decoding
meanwhile are not touched (one prefill per step: its first token goes out at once, and the others keep decoding
between two prefills); a cancelled one (its client disconnected) frees its row. Then one `model(tokens, cache=cache,
input_pos=positions)` call decodes a token for every row in use, each row at its own position (rows are seated
lowest first, and a step runs the first 1, 2, 4, ... max_batch rows that hold them: a lone conversation decodes at
batch 1). Requests thus join and leave between any two steps (continuous batching); those beyond max_batch wait in
arrival order. A GLA/SWA row has one size at any context (GLA state + a ring of window + 1 keys); a full-attention
row holds --max_len positions.

The loop is ours, on LitServe's hook for custom loops (LitLoop.run), because LitServe 0.2.19's ContinuousBatchingLoop
does not serve here: it hands encode_response's result to the transport as it is, and under OpenAISpec that is a
generator ("cannot pickle 'generator' object"); while idle it polls with asyncio.sleep(0) (a quarter of a core here);
and nothing in LitServe tells the worker that a client went away, so its rows would decode for nobody until
max_tokens. Here the HTTP process queues a cancellation when a response ends early.
"""
import asyncio
import codecs
import collections
import copy
import json
import logging
import os
import signal
import sys
import time
import traceback
import uuid
from typing import Optional, Union

import litserve as ls
import torch
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.loops.base import LitLoop
from litserve.specs.openai import ChatCompletionRequest, OpenAISpec, TextContent
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem
from pydantic import BaseModel

import convert
import kernels
from model import penalize, sample

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- the worker: one conversation a row

class Conversation:
    """One request in the worker: prompt ids, sampling settings, and the reply so far turned into text for the client.
    Text that could be the start of a stop string is held back until the next tokens decide."""

    def __init__(self, uid, queue_id, job, tok, device):
        self.uid, self.queue_id, self.tok, self.ids = uid, queue_id, tok, job["ids"]   # queue_id: the HTTP process's
        self.max_tokens, self.stop, self.temperature, self.top_p = (job[k] for k in ("max_tokens", "stop",
                                                                                      "temperature", "top_p"))
        self.penalties = [job["repetition_penalty"], job["frequency_penalty"], job["presence_penalty"]]
        self.penalized = self.penalties != [1.0, 0.0, 0.0]
        self.ignore_eos = job["ignore_eos"]
        self.gen = torch.Generator(device)   # its own: a seed gives one reply whatever else is decoding
        if job["seed"] is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(job["seed"])
        self.reply, self.held = [], ""
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")   # a token may end inside a character

    def add(self, t, stop_ids):
        """Token t -> (text the client gets now, finish_reason or None). A stop token is not part of the reply, unless
        the request ignores them: then it is one more token and its text."""
        if t in stop_ids and not self.ignore_eos:
            return self.held + self.dec.decode(b"", final=True), "stop"
        self.reply.append(t)
        text = self.held + self.dec.decode(self.tok.decode_bytes([t]))
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], "stop"
        if len(self.reply) == self.max_tokens:
            return text + self.dec.decode(b"", final=True), "length"
        keep = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], None


def rows_of(module, n):
    """A shallow copy of `module` (a model.Cache, and its submodules likewise) whose buffers are the first n rows of
    its buffers: the same storage, so what a decode step writes through it lands in the original."""
    view = copy.copy(module)
    view._buffers = {k: b[:n] for k, b in module._buffers.items()}
    view._modules = {k: rows_of(m, n) for k, m in module._modules.items()}
    return view


class Engine:
    """max_batch rows of one batched cache, a conversation in each; `step` seats waiting conversations in free rows
    and decodes one token for every row."""

    def __init__(self, model, tok, max_batch, max_len, prefill_chunk=32768, compile=False, err=None):
        self.model, self.tok, self.max_len, self.chunk, self.compiled = model, tok, max_len, prefill_chunk, compile
        self.device, self.err = model.lm_head.weight.device, err or sys.stderr
        self.cache = model.new_cache(max_batch, max_len)
        self.rows = [None] * max_batch                   # the Conversation in each row; None: free
        self.waiting = collections.deque()
        # each row's next input: its last token and that token's position. A free row decodes too (one shape for
        # every step: one compiled graph) at a position its cache can take; its result is dropped.
        self.next, self.pos = [0] * max_batch, [model.config.n_sink] * max_batch
        V = tok.n_vocab
        self.counts = torch.zeros(max_batch, V, device=self.device)                  # reply tokens: OpenAI penalties
        self.seen = torch.zeros(max_batch, V, dtype=torch.bool, device=self.device)  # prompt + reply: repetition
        self.penalty = torch.zeros(max_batch, 3, device=self.device)                 # repetition, frequency, presence
        self.stop_ids = {tok.special_tokens[s] for s in ("<|endoftext|>", "<|im_end|>") if s in tok.special_tokens}
        # a step decodes the first n rows only, n the power of two (or max_batch) past the last seated row: rows are
        # seated lowest first, so one conversation costs a batch-1 step, not a max_batch one. Each n has its own view
        # of the cache (same storage) and, compiled, its own graph (a cache's buffers have static shapes in dynamo).
        self.sizes = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.views = {n: self.cache if n == max_batch else rows_of(self.cache, n) for n in self.sizes}
        self.steps = {n: model.forward for n in self.sizes}   # the decode step of n rows
        if compile:
            kernels.compile_blocks(model)
            # coordinate-descent tuning for batch 1 only: it is what turns that step's matmuls into tuned GEMVs; at
            # more rows they stay cuBLAS's and the tuning would only add its cost to every row count's compile
            one = kernels.compile_decode(model.forward, self.device)
            more = kernels.compile_decode(model.forward, self.device, gemv=False) if self.device.type == "cuda" else one
            self.steps = {n: one if n == 1 else more for n in self.sizes}
            for v in self.views.values():
                kernels.static_cache(v)
            # warm_up compiles a fixed set of graphs per function (prefill regimes times layer kinds, a decode step
            # per row count); past dynamo's default limit of 8 the rest would run uncompiled
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.warm_up()

    @property
    def idle(self):
        return not self.waiting and all(c is None for c in self.rows)

    @torch.no_grad()
    def warm_up(self):
        """Compile every graph a request can need now, not inside the first requests (steady state compiles nothing),
        and print each stage's time (a big model's start is long). Prefill: prompt lengths 5 and 6 (the second makes
        the length dynamic), 1 to 4 (one token takes the decode path, and the GLA layers run a few tokens
        recurrently) and on CUDA 129 and 130 (SWA prefill moves to flex_attention past 128 tokens); a length an
        earlier graph covers only runs. (On a CPU the reference GLA unrolls its 64-token chunks: a longer prompt
        compiles once per chunk count.) Decode: a graph per row count, 3 runs each (CUDA graph trees: a warm-up run,
        a recording, a replay)."""
        t0 = t = time.perf_counter()
        lengths = (5, 6, 1, 2, 3, 4) + ((129, 130) if self.device.type == "cuda" else ())
        lengths = [n for n in lengths if n < self.max_len]   # a prompt leaves room for a token
        self.say(f"compiling the prefill (prompts of {', '.join(map(str, lengths))} tokens) and the decode step "
                 f"(for {', '.join(map(str, self.sizes))} rows)")
        tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        for n in lengths:
            self.model(tok.expand(1, n), cache=self.model.new_cache(1, self.max_len), last_only=True)
        self.say(f"prefill compiled in {time.perf_counter() - t:.1f} s")
        for n in self.sizes:
            t = time.perf_counter()
            for _ in range(3):
                self.decode(n)
            self.say(f"decode for {n} row{'s' if n > 1 else ''} compiled in {time.perf_counter() - t:.1f} s")
        self.say(f"done in {time.perf_counter() - t0:.1f} s")

    def say(self, what):
        print(f"warm-up: {what}", file=self.err, flush=True)

    def decode(self, n):
        """One decode step over the first n rows -> logits [n, V]."""
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        tok = torch.tensor(self.next[:n], device=self.device)[:, None]
        pos = torch.tensor(self.pos[:n], device=self.device)[:, None]
        return self.steps[n](tok, cache=self.views[n], input_pos=pos, last_only=True)[0][:, -1]

    def pick(self, logits, rows):
        """Each row's next token from its logits [len(rows), V]: penalties, then greedy or sampled."""
        logits, convs = logits[:, :self.tok.n_vocab], [self.rows[i] for i in rows]   # never a padded-vocab id
        if any(c.penalized for c in convs):
            r = torch.tensor(rows, device=self.device)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            rep, freq, pres = self.penalty[r, :, None].to(logits.dtype).unbind(1)   # [rows, 1] each
            counts = self.counts[r]
            logits = penalize(logits, self.seen[r], rep) - freq * counts - pres * (counts > 0)
        out = logits.argmax(-1).tolist()
        for j, c in enumerate(convs):
            if c.temperature > 0:
                out[j] = sample(logits[j:j + 1], c.temperature, None, c.top_p, c.gen).item()
        return out

    @torch.no_grad()
    def admit(self, c, i):
        """Prefill c alone into a batch-1 cache, in chunks, and copy that into row i. Returns c's first token."""
        one = self.model.new_cache(1, self.max_len)
        ids = torch.tensor([c.ids], device=self.device)
        for a in range(0, ids.shape[1], self.chunk):
            logits = self.model(ids[:, a:a + self.chunk], cache=one, last_only=True)[0]
        for dst, src in zip(self.cache.buffers(), one.buffers()):   # row i := the prefilled row (same config)
            dst[i].copy_(src[0])
        self.rows[i], self.pos[i] = c, one.seen
        self.counts[i], self.seen[i] = 0, False
        self.seen[i, ids[0]] = True
        self.penalty[i] = torch.tensor(c.penalties)
        return self.pick(logits[:, -1], [i])[0]

    def advance(self, i, t):
        """Row i's conversation takes token t -> its message for the client. A finished one frees the row."""
        c = self.rows[i]
        text, finish = c.add(t, self.stop_ids)
        if finish:
            self.rows[i] = None
        else:
            self.next[i] = t
            if c.penalized:
                self.counts[i, t] += 1
                self.seen[i, t] = True
        return c, dict(text=text, finish_reason=finish, prompt_tokens=len(c.ids), completion_tokens=len(c.reply))

    @torch.no_grad()
    def step(self):
        """Seat the first waiting conversation in a free row, then decode one token for every row. One prefill per
        step: its first token goes out as soon as it is made, and the rows already decoding advance a token between
        two prefills instead of waiting for every queued prompt. Returns [(conversation, message)]; a message with
        text "" and no finish_reason is dropped."""
        out, free = [], next((i for i, c in enumerate(self.rows) if c is None), None)   # the lowest free row
        if free is not None and self.waiting:
            c = self.waiting.popleft()
            try:
                out.append(self.advance(free, self.admit(c, free)))
            except Exception as e:   # this prompt's prefill failed (out of memory?): the others go on
                traceback.print_exc()
                self.rows[free] = None
                out.append((c, dict(error=f"prefill failed: {type(e).__name__}: {e}")))
        rows = [i for i, c in enumerate(self.rows) if c is not None]
        if rows:
            logits = self.decode(next(n for n in self.sizes if n > rows[-1]))
            for i in rows:
                self.pos[i] += 1
            out += [self.advance(i, t) for i, t in zip(rows, self.pick(logits[rows], rows))]
        return [(c, m) for c, m in out if m.get("text") or m.get("finish_reason") or "error" in m]

    def cancel(self, uid):
        """Drop the conversation whose client went away; its row is free from the next step on."""
        self.waiting = collections.deque(c for c in self.waiting if c.uid != uid)
        self.rows = [None if c is not None and c.uid == uid else c for c in self.rows]

    def drop_all(self):
        gone = [c for c in self.rows if c is not None] + list(self.waiting)
        self.rows, self.waiting = [None] * len(self.rows), collections.deque()
        return gone


class Loop(LitLoop):
    """The inference worker's loop; LitServe calls run() over and over. One call: take what the HTTP process queued
    (new conversations, cancellations), one Engine.step, its messages back to the HTTP process."""

    def run(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner):
        engine = lit_api.engine
        item = self.get_request(request_queue, block=engine.idle, timeout=1.0)   # idle: wait here, not in a spin
        while item is not None:
            queue_id, uid, _, job = item
            if job is not None and "cancel" in job:
                engine.cancel(job["cancel"])
            elif job is not None:   # None: LitServe's stop sentinel (the process is terminated next)
                engine.waiting.append(Conversation(uid, queue_id, job, engine.tok, engine.device))
            item = self.get_request(request_queue, block=False)
        if engine.idle:
            return
        try:
            out = engine.step()
        except Exception as e:   # the rows' state is unknown now: end every conversation, keep serving new ones
            traceback.print_exc()
            out = [(c, dict(error=f"decode step failed: {type(e).__name__}: {e}")) for c in engine.drop_all()]
        for c, m in out:
            status = LitAPIStatus.ERROR if "error" in m else LitAPIStatus.OK
            self.put_response(transport, c.queue_id, c.uid, m, status, LoopResponseType.STREAMING)


class API(ls.LitAPI):
    """The model's side for LitServe: setup() loads the checkpoint in the inference worker; Loop does the rest."""

    def __init__(self, spec, **load):
        super().__init__(max_batch_size=load["max_batch"], spec=spec, loop=Loop())
        self.load = load

    def setup(self, device):   # LitServe's device name is not used: --device is (cuda:N included)
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches every process; the main one stops this one
        a, t0 = self.load, time.perf_counter()
        model, tok = convert.load(a["ckpt"], a["device"], a["dtype"], a["tokenizer"])
        self.engine = Engine(model, tok, a["max_batch"], a["max_len"], a["prefill_chunk"], a["compile"])
        print(f"loaded {a['ckpt']} ({model.config.name}, {model.num_params() / 1e6:,.1f}M parameters, "
              f"{a['dtype']}, {a['device']}) in {time.perf_counter() - t0:.1f} s; serving {a['name']} on "
              f"{a['url']}, {a['max_batch']} rows of {a['max_len']} tokens "
              f"({self.engine.cache.nbytes() / a['max_batch'] / 2**20:.2f} MiB of cache each)", file=sys.stderr,
              flush=True)


# ----------------------------------------------------------------------------- the HTTP side: OpenAI's formats

class Sampling(BaseModel):
    """Fields both endpoints take; defaults are OpenAI's."""
    model: Optional[str] = None
    n: Optional[int] = 1
    stream: Optional[bool] = False
    max_tokens: Optional[int] = None
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    repetition_penalty: Optional[float] = 1.0
    ignore_eos: Optional[bool] = False


class ChatRequest(Sampling, ChatCompletionRequest):   # LitServe's (messages, tools, response_format) + ours
    logprobs: Optional[bool] = None


class CompletionRequest(Sampling):
    prompt: str
    max_tokens: Optional[int] = 16   # OpenAI's default for completions
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    suffix: Optional[str] = None


def error(status, message, param=None, code=None):
    """An OpenAI-style error response."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(dict(error=dict(message=message, type=kind, param=param, code=code)), status_code=status)


async def invalid_body(request, exc):
    """FastAPI answers a body that does not parse with 422 {"detail": ...}; OpenAI clients expect 400 {"error": ...}."""
    e = exc.errors()[0]
    if e["type"] == "json_invalid":
        return error(400, f"the request body is not JSON ({e['ctx']['error']})")
    where = ".".join(str(x) for x in e["loc"] if x != "body")
    return error(400, f"{where}: {e['msg']}" if where else e["msg"], where or None)


def body(head, chat, stream, text, finish, usage, role=False):
    """A chat.completion(.chunk) or text_completion object with one choice."""
    if chat and stream:
        choice = dict(delta=dict(role="assistant", content=text) if role else dict(content=text))
    elif chat:
        choice = dict(message=dict(role="assistant", content=text))
    else:
        choice = dict(text=text)
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {**head, "object": kind, "choices": [dict(index=0, **choice, logprobs=None, finish_reason=finish)],
            "usage": usage}


def usage(m):
    return dict(prompt_tokens=m["prompt_tokens"], completion_tokens=m["completion_tokens"],
                total_tokens=m["prompt_tokens"] + m["completion_tokens"])


class WorkerError(Exception):
    pass


class Spec(OpenAISpec):
    """The HTTP process: checks, ChatML, queueing, and the OpenAI response formats (LitServe's plumbing: the request
    queue to the worker, the response buffer it fills, its data_streamer)."""

    def __init__(self, tok, name, max_len):
        super().__init__()
        self.tok, self.name, self.max_len, self.created = tok, name, max_len, int(time.time())

    def __getstate__(self):   # the worker gets a copy inside the LitAPI and needs no tokenizer from it
        return {**super().__getstate__(), "tok": None}

    def pre_setup(self, lit_api):   # OpenAISpec's checks are for its predict()-driven loops, which do not run here
        self.add_endpoint("/v1/chat/completions", self.chat, ["POST"])
        self.add_endpoint("/v1/completions", self.complete, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])

    async def models(self):
        return dict(object="list", data=[dict(id=self.name, object="model", created=self.created, owned_by="local")])

    async def chat(self, req: ChatRequest, raw: Request):
        sp = self.tok.special_tokens
        if "<|im_start|>" not in sp or "<|im_end|>" not in sp:
            return error(400, "this model's tokenizer has no <|im_start|>/<|im_end|> tokens, so it cannot chat: use "
                              "/v1/completions")
        if req.tools or req.logprobs or (req.response_format and req.response_format.type != "text"):
            return error(400, "tools, logprobs and response_format are not supported by this server")
        messages = []
        for m in req.messages:
            parts = m.content if isinstance(m.content, list) else [TextContent(type="text", text=m.content or "")]
            if not all(isinstance(p, TextContent) for p in parts):
                return error(400, "only text content is supported (no images or audio)", "messages")
            messages.append(dict(role=m.role, content="".join(p.text for p in parts)))
        try:
            ids = self.tok.encode_chat(messages, add_generation_prompt=True)[0]
        except ValueError as e:
            return error(400, str(e), "messages")
        n = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        return await self.respond(req, ids, n, raw, chat=True)

    async def complete(self, req: CompletionRequest, raw: Request):
        if req.echo or req.logprobs is not None or req.suffix:
            return error(400, "echo, logprobs and suffix are not supported by this server")
        ids = self.tok.encode(req.prompt, specials=True)   # as generate.py --prompt: "<|im_start|>" is the token
        return await self.respond(req, ids, req.max_tokens, raw, chat=False)

    def check(self, req, ids, max_tokens):
        """The worker's job for a request, or an OpenAI-style error response that names the bad parameter."""
        if req.model and req.model != self.name:
            return error(404, f"The model `{req.model}` does not exist: this server serves `{self.name}` (GET "
                              f"/v1/models)", "model", "model_not_found")
        t, p = (1.0 if req.temperature is None else req.temperature), (1.0 if req.top_p is None else req.top_p)
        rep = 1.0 if req.repetition_penalty is None else req.repetition_penalty
        freq, pres = req.frequency_penalty or 0.0, req.presence_penalty or 0.0
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        for param, value, ok, why in (("n", req.n, req.n in (None, 1), "must be 1 (one choice per request)"),
                                      ("temperature", t, t >= 0, "must be >= 0 (0 is greedy)"),
                                      ("top_p", p, 0 < p <= 1, "must be in (0, 1]"),
                                      ("max_tokens", max_tokens, max_tokens is None or max_tokens >= 1, "must be >= 1"),
                                      ("frequency_penalty", freq, -2 <= freq <= 2, "must be in [-2, 2]"),
                                      ("presence_penalty", pres, -2 <= pres <= 2, "must be in [-2, 2]"),
                                      ("repetition_penalty", rep, rep > 0, "must be > 0 (1 is off)"),
                                      ("stop", stop, all(stop), "must not hold an empty string")):
            if not ok:
                return error(400, f"{param}={value!r} {why}", param)
        what = "messages" if isinstance(req, ChatRequest) else "prompt"
        if not ids:
            return error(400, f"the {what} encode to no tokens: give at least one", what)
        room = self.max_len - len(ids)
        if room < (max_tokens or 1):
            return error(400, f"This model's maximum context length is {self.max_len} tokens; the {what} take "
                              f"{len(ids)} and the reply {max_tokens or 1} more: shorten the {what}"
                              f"{' or lower max_tokens' if max_tokens else ''}", what, "context_length_exceeded")
        return dict(ids=ids, max_tokens=max_tokens or room, temperature=t, top_p=p, seed=req.seed, stop=stop,
                    repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres,
                    ignore_eos=bool(req.ignore_eos))

    async def respond(self, req, ids, max_tokens, raw, chat):
        job = self.check(req, ids, max_tokens)
        if isinstance(job, JSONResponse):
            return job
        uid, q, event = uuid.uuid4(), collections.deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=q, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
        head = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uid.hex}", created=int(time.time()), model=self.name)
        if req.stream:   # a disconnect cancels the response's task: replies() learns it from the cancellation
            return StreamingResponse(self.events(self.replies(uid, q, event), head, chat),
                                     media_type="text/event-stream")
        text, last = [], None
        try:
            async for m in self.replies(uid, q, event, raw):
                text.append(m["text"])
                last = m
        except WorkerError as e:
            return error(500, str(e))
        if last is None or not last["finish_reason"]:   # the client went away; nobody reads this
            return error(499, "client disconnected")
        return body(head, chat, False, "".join(text), last["finish_reason"], usage(last))

    async def events(self, replies, head, chat):
        """Server-sent events: a chunk per message from the worker, usage in the last one, then [DONE]."""
        first = True
        try:
            async for m in replies:
                chunk = body(head, chat, True, m["text"], m["finish_reason"],
                             usage(m) if m["finish_reason"] else None, role=first)
                first = False
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        except WorkerError as e:
            yield f"data: {json.dumps(dict(error=dict(message=str(e), type='server_error', code=None)))}\n\n"

    async def replies(self, uid, q, event, raw=None):
        """The worker's messages for request uid up to the one with a finish_reason. Leaving before that (the client
        disconnected: the stream was cancelled, or raw says so) tells the worker to free the row."""
        done = False
        try:
            async for m, status in self.data_streamer(q, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    raise WorkerError(m["error"] if isinstance(m, dict) else "the inference worker died")
                done = m["finish_reason"] is not None
                yield m
                if done or raw is not None and await raw.is_disconnected():
                    return
        finally:
            self.response_buffer.pop(uid, None)
            if not done:
                self.request_queue.put((self.response_queue_id, uuid.uuid4(), time.monotonic(), {"cancel": uid}))


# ----------------------------------------------------------------------------- main

def main(*, ckpt: str, tokenizer: str | None = None, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
         max_len: int | None = None, prefill_chunk: int = 32768, device: str = DEFAULT_DEVICE, dtype: str | None = None,
         compile: bool = False, name: str | None = None) -> None:
    """Serve a checkpoint to OpenAI clients until Ctrl-C or SIGTERM.

    Args:
        ckpt: checkpoint directory: ours (float, W8ASpike or FP8) or a released SpikingBrain-7B directory.
        tokenizer: tokenizer directory, when the checkpoint has none.
        host: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface).
        port: TCP port.
        max_batch: conversations decoded together (rows of the batched cache); more wait in arrival order.
        max_len: longest prompt + reply a row holds (default config.max_seq_len). GLA/SWA rows have one size at any
            length; a full-attention row takes memory in proportion.
        prefill_chunk: prompt tokens per forward pass while prefilling a new conversation.
        device: cuda, cuda:N or cpu.
        dtype: weights and activations (default bfloat16 on CUDA, float32 on CPU).
        compile: torch.compile the blocks for prefill and the batched decode step (CUDA graphs on GPU), all of it
            before serving (Engine.warm_up: a `warm-up:` line per stage on stderr).
        name: the model name clients send (default: the config's preset name, else the checkpoint directory's).
    """
    if max_batch < 1 or prefill_chunk < 1:
        raise ValueError(f"need max_batch >= 1 and prefill_chunk >= 1; got {max_batch}, {prefill_chunk}")
    convert.check_device(device)
    tok = convert.load_tokenizer(ckpt, tokenizer)   # fails fast, before LitServe starts any process
    config = convert.read_config(ckpt)
    max_len = max_len or config.max_seq_len
    if not 2 <= max_len <= config.max_seq_len:
        raise ValueError(f"max_len={max_len} must be in 2 .. config.max_seq_len={config.max_seq_len}")
    name = name or (config.name if config.name != "custom" else os.path.basename(os.path.normpath(ckpt)))
    dt = convert.resolve_dtype(dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    api = API(Spec(tok, name, max_len), ckpt=ckpt, tokenizer=tokenizer, device=device, dtype=dt, max_batch=max_batch,
              max_len=max_len, prefill_chunk=prefill_chunk, compile=compile, name=name, url=f"http://{host}:{port}/v1")
    server = ls.LitServer(api, accelerator="cuda" if device.startswith("cuda") else "cpu", devices=1,
                          timeout=False)   # no queue timeout: a long reply is not a stuck one
    server.app.add_exception_handler(RequestValidationError, invalid_body)

    def stop(sig, frame):
        # LitServe 0.2.19's worker monitor polls its shutdown flag through a manager process that its own shutdown
        # may end first; the monitor then logs a broken pipe as a crash. From here on that thread's record is noise.
        logging.getLogger("litserve.server").addFilter(lambda r: r.getMessage() != "Monitoring worker crashed")
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, stop)   # a process manager's stop ends LitServe's processes as Ctrl-C does
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, old))   # not in its forks: they just exit
    print(f"loading {ckpt} in the inference worker ...", file=sys.stderr, flush=True)
    server.run(host=host, port=port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    from jsonargparse import CLI
    try:
        CLI(main, as_positional=False)
    except (ValueError, OSError) as e:   # bad input: the message says what and where, a traceback adds nothing
        sys.exit(f"error: {e}")

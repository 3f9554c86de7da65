"""serve.py: the batched engine against generate.py's serial generation in-process, then the server as a client sees it
(its own process on 127.0.0.1, the `openai` client and raw HTTP). Skipped without the serve extra."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import convert
import tokenizer
from generate import Generator
from model import GPT, Config
from test_generate import SPECIALS, tiny

pytest.importorskip("litserve")
openai = pytest.importorskip("openai")
import serve  # noqa: E402 (needs litserve)

ROOT = Path(__file__).resolve().parents[1]
STOPS = {SPECIALS["<|endoftext|>"], SPECIALS["<|im_end|>"]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok_dir):
    torch.manual_seed(0)   # the replies the disconnect test relies on (no stop token in 4000) are this model's
    m = GPT(Config.from_name("tiny"))
    out = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    convert.save_checkpoint(m, m.config, out, tok_dir)
    return out


def job(ids, n, **kw):
    return dict(dict(ids=ids, max_tokens=n, temperature=0.0, top_p=1.0, seed=None, stop=[], repetition_penalty=1.0,
                     frequency_penalty=0.0, presence_penalty=0.0, ignore_eos=False), **kw)


def serial(model, tok, ids, n, penalty=1.0):
    """generate.py's reply to ids alone (greedy, default stop tokens)."""
    gen = Generator(model, tok, temperature=0, max_new_tokens=n, repetition_penalty=penalty, err=io.StringIO())
    return gen.extend(list(ids), io.StringIO())[0]


def openai_penalized(model, ids, n, freq, pres, n_vocab=259):
    """Greedy with OpenAI's penalties over the reply, the whole sequence through the model for every token."""
    reply = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + reply]))[0][0, -1, :n_vocab]
            counts = torch.bincount(torch.tensor(reply, dtype=torch.long), minlength=n_vocab).to(logits.dtype)
            t = int((logits - freq * counts - pres * (counts > 0)).argmax())
            if t in STOPS:
                break
            reply.append(t)
    return reply


def run(engine, arrivals, cancel=()):
    """Step the engine; arrivals {step: [(uid, job)]} join the waiting line at their step, (step, uid) in cancel is
    cancelled then. Returns {uid: reply ids} of the finished conversations."""
    done, step, arrivals = {}, 0, dict(arrivals)
    while arrivals or not engine.idle:
        for uid, j in arrivals.pop(step, []):
            engine.waiting.append(serve.Conversation(uid, 0, j, engine.tok, engine.device))
        for s, uid in cancel:
            if s == step:
                engine.cancel(uid)
        for c, m in engine.step():
            assert "error" not in m, m
            if m["finish_reason"]:
                done[c.uid] = c.reply
        step += 1
    return done


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-qwen"])
def test_rows_decode_as_each_conversation_alone(name, tok_dir):
    """Conversations of different lengths join a full batch at different steps (rows at different positions, SWA
    rings wrapped, sinks, full attention), one is cancelled midway: each reply is generate.py's for it alone."""
    m, tok = tiny(name), tokenizer.Tokenizer(tok_dir)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 40, 17, 9, 26, 33, 5)]
    lengths = [20, 12, 30, 25, 8, 16, 22]
    jobs = [job(p, n) for p, n in zip(prompts, lengths)]
    jobs[3]["repetition_penalty"] = 1.3                                  # generate.py's penalty, over prompt + reply
    jobs[5].update(frequency_penalty=1.5, presence_penalty=0.5)          # OpenAI's, over the reply
    arrivals = {0: [(0, jobs[0]), (1, jobs[1]), ("gone", job(prompts[2], 60))], 2: [(2, jobs[2]), (3, jobs[3])],
                3: [(4, jobs[4])], 7: [(5, jobs[5]), (6, jobs[6])]}
    got = run(serve.Engine(m, tok, max_batch=3, max_len=128), arrivals, cancel=[(5, "gone")])
    assert "gone" not in got and sorted(got, key=str) == list(range(7))
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        want = (openai_penalized(m, p, n, 1.5, 0.5) if i == 5 else
                serial(m, tok, p, n, penalty=jobs[i]["repetition_penalty"]))
        assert got[i] == want, i


def test_seeded_sampling_ignores_the_company(tok_dir):
    m, tok = tiny("tiny"), tokenizer.Tokenizer(tok_dir)
    sampled = job([5, 6, 7], 24, temperature=0.9, top_p=0.95, seed=11)
    alone = run(serve.Engine(m, tok, 4, 128), {0: [("s", sampled)]})["s"]
    crowd = run(serve.Engine(m, tok, 4, 128), {0: [(0, job([1, 2], 30)), ("s", sampled)], 1: [(1, job([9], 9))]})
    assert crowd["s"] == alone and len(alone) > 0


def test_stop_strings_hold_back_text_and_cut_the_reply(tok_dir):
    tok = tokenizer.Tokenizer(tok_dir)

    def stream(data, stop, n=100, **kw):
        c, pieces = serve.Conversation(0, 0, job([1], n, stop=stop, **kw), tok, torch.device("cpu")), []
        for b in data:
            piece, finish = c.add(b, STOPS)
            pieces.append(piece)
            if finish:
                return pieces, finish
        return pieces, None

    pieces, finish = stream(b"hello world", ["o w"])
    assert "".join(pieces) == "hell" and finish == "stop" and pieces[4] == ""   # "o" waited: it could begin "o w"
    assert stream(b"lol", ["lx"], n=3) == (["", "lo", "l"], "length")   # a held "l" goes out once it cannot stop
    assert stream("é!".encode(), [], n=3)[0] == ["", "é", "!"]          # a character split over two tokens
    assert stream([*b"ab", 258], []) == (["a", "b", ""], "stop")      # a stop token is not text
    assert stream([*b"a", 258, 256, *b"b"], [], n=4, ignore_eos=True) == (["a", "<|im_end|>", "<|endoftext|>", "b"],
                                                                         "length")   # unless the request ignores them


# ----------------------------------------------------------------------------- the server

def http(url, body=None):
    """(status, JSON or text) of a GET, or of a POST of `body` (bytes)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt, log):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = dict(os.environ, OMP_NUM_THREADS="1")   # a tiny model; the 2 cores are shared with the test
        self.proc = subprocess.Popen([sys.executable, "serve.py", "--ckpt", ckpt, "--port", str(self.port),
                                      "--max_batch", "4", "--device", "cpu", "--dtype", "float64"],
                                     cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)   # its own process group: stop() ends every process
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if http(f"http://127.0.0.1:{self.port}/health") == (200, "ok"):
                    return
            except OSError:   # not listening yet
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the server did not come up:\n{Path(log).read_text()[-3000:]}")

    def client(self):
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    s = Server(ckpt, tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    s.stop()   # when test_shutdown did not run or failed


@pytest.fixture(scope="module")
def ref(ckpt):
    model, tok = convert.load(ckpt, "cpu", "float64")   # as the server loads it (--dtype float64)

    def reply(text, n):
        ids = tok.encode_chat([dict(role="user", content=text)], add_generation_prompt=True)[0]
        return tok.decode_bytes(serial(model, tok, ids, n)).decode("utf-8", "replace")
    return reply


def chat(client, text, n, stream=False, **kw):
    """(reply text, finish_reason, usage) of one chat completion."""
    r = client.chat.completions.create(model="tiny", messages=[dict(role="user", content=text)], max_tokens=n,
                                       temperature=0, stream=stream, **kw)
    if not stream:
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    parts, finish, use = [], None, None
    for chunk in r:
        parts.append(chunk.choices[0].delta.content or "")
        finish, use = chunk.choices[0].finish_reason or finish, chunk.usage or use
    return "".join(parts), finish, use


PROMPT = "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"   # ChatML of one user message


@pytest.fixture(scope="module")
def generate_py(ckpt):
    """generate.py --prompt PROMPT, greedy, started before the server so that the two start up together."""
    return subprocess.Popen([sys.executable, "generate.py", "--ckpt", ckpt, "--prompt", PROMPT, "--temperature", "0",
                             "--repetition_penalty", "1", "--max_new_tokens", "40", "--device", "cpu", "--dtype",
                             "float64"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_greedy_reply_equals_generate_py(generate_py, server, ckpt):
    """The same messages: streamed, not streamed, as the raw ChatML prompt on /v1/completions, and generate.py
    --prompt with that prompt give one text."""
    out, err = generate_py.communicate(timeout=120)
    assert generate_py.returncode == 0, err.decode()
    want, prompt = out.decode()[:-1], PROMPT                              # generate.py ends the reply with "\n"
    client = server.client()
    text, finish, use = chat(client, "Hello there", 40)
    assert text == want and finish == "length"
    n = len(tokenizer.Tokenizer(ckpt).encode(prompt, specials=True))
    assert (use.prompt_tokens, use.completion_tokens, use.total_tokens) == (n, 40, n + 40)
    assert chat(client, "Hello there", 40, stream=True) == (text, finish, use)
    c = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
    assert c.choices[0].text == want and c.usage.completion_tokens == 40
    cut = want.find(want[20:23])                                          # stop strings end the reply before them
    assert chat(client, "Hello there", 40, stop=[want[20:23], "\x00never"])[:2] == (want[:cut], "stop")


def test_concurrent_clients_get_their_serial_replies(server, ref):
    """8 clients at once on 4 rows: half wait and join as rows free up; streamed and not, each gets its own reply."""
    texts = [f"Question {i}: {'why ' * i}is the sky blue?" for i in range(8)]
    lengths = [12 + 5 * i for i in range(8)]
    got, start = {}, threading.Barrier(8)

    def ask(i):
        start.wait(timeout=30)
        got[i] = chat(server.client(), texts[i], lengths[i], stream=i % 2 == 0)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(got) == list(range(8))
    for i in range(8):
        assert got[i][0] == ref(texts[i], lengths[i]), i
        assert got[i][2].completion_tokens == lengths[i]


def test_disconnected_clients_free_their_rows_and_disturb_nobody(server, ref):
    client = server.client()
    got = {}

    def ask(i, text):
        got[i] = chat(client, text, 40, stream=True)[0]
    threads = [threading.Thread(target=ask, args=(i, f"Stay {i}")) for i in range(2)]
    for t in threads:
        t.start()
    gone = client.chat.completions.create(model="tiny", messages=[dict(role="user", content="Leave")], max_tokens=3000,
                                          temperature=0, stream=True)
    next(gone), next(gone)
    gone.close()                                                          # mid-stream: the connection drops
    for t in threads:
        t.join(timeout=60)
    assert got == {i: ref(f"Stay {i}", 40) for i in range(2)}
    # every row on a 4000-token reply (no stop token in these: checked with this model), every client gone after its
    # first token: a new request is answered about as fast as on an idle server, not ~4000 steps later
    quick = []
    for _ in range(3):
        t0 = time.monotonic()
        assert chat(client, "Quick", 8)[0] == ref("Quick", 8)
        quick.append(time.monotonic() - t0)
    streams = [client.chat.completions.create(model="tiny", messages=[dict(role="user", content=t)], max_tokens=4000,
                                              temperature=0, stream=True)
               for t in ("Hello", "abc", "Why?", "The quick brown fox")]
    for s in streams:
        next(s)
        s.close()
    t0 = time.monotonic()
    assert chat(client, "Quick", 8)[0] == ref("Quick", 8)
    assert time.monotonic() - t0 < max(10 * min(quick), 1.0), (time.monotonic() - t0, quick)   # blocked: ~6 s here


@pytest.mark.parametrize("path, payload, status, param", [
    ("chat/completions", dict(temperature=-1), 400, "temperature"),
    ("chat/completions", dict(top_p=0), 400, "top_p"),
    ("chat/completions", dict(max_tokens=0), 400, "max_tokens"),
    ("chat/completions", dict(n=2), 400, "n"),
    ("chat/completions", dict(model="gpt-4o"), 404, "model"),
    ("chat/completions", dict(messages=[dict(role="user", content="x" * 5000)]), 400, "messages"),   # > max_seq_len
    ("chat/completions", dict(max_tokens=4090), 400, "messages"),          # prompt + reply > max_seq_len
    ("chat/completions", dict(messages=[dict(role="tool", content="x")]), 400, "messages"),
    ("chat/completions", dict(messages="hello"), 400, "messages"),        # does not parse
    ("chat/completions", None, 400, None),                                # not JSON
    ("completions", dict(prompt=""), 400, "prompt"),
    ("completions", dict(prompt="x", echo=True), 400, None),
])
def test_bad_requests_get_openai_errors(server, path, payload, status, param):
    base = dict(model="tiny", max_tokens=4) | ({} if path == "completions" else
                                               dict(messages=[dict(role="user", content="hi")]))
    data = b"{not json" if payload is None else json.dumps(base | payload).encode()
    code, answer = http(f"{server.url}/{path}", data)
    assert code == status, answer
    err = answer["error"]
    assert err["message"] and err["param"] == param, err
    assert chat(server.client(), "still there?", 4)[1] == "length"       # and the server goes on


def test_shutdown_is_clean(server):
    """SIGTERM (what a process manager sends): LitServe stops its processes and the server exits with status 0."""
    children = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, Path(server.log).read_text()[-3000:]
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{c}") for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert children and not [c for c in children if os.path.exists(f"/proc/{c}")]
    assert "Traceback" not in Path(server.log).read_text()


def test_a_step_decodes_only_the_rows_in_use(tok_dir, monkeypatch):
    """Rows are seated lowest first, one prefill per step, and a step runs the first n rows, n the power of two past
    the last seated one, through a view of the cache that writes into it: one conversation in an 8-row engine decodes
    batch-1 steps and replies as it does alone."""
    m, tok = tiny("tiny"), tokenizer.Tokenizer(tok_dir)
    engine = serve.Engine(m, tok, max_batch=8, max_len=64)
    assert engine.sizes == [1, 2, 4, 8]
    for v in engine.views.values():   # views of the same storage
        assert [b.data_ptr() for b in v.buffers()] == [b.data_ptr() for b in engine.cache.buffers()]
    batches, forward = [], m.forward
    engine.steps = {n: lambda idx, **kw: (batches.append(idx.shape[0]), forward(idx, **kw))[1] for n in engine.sizes}
    prompt = list(b"one row of eight")
    got = run(engine, {0: [(0, job(prompt, 10))]})
    assert got[0] == serial(m, tok, prompt, 10) and set(batches) == {1}
    batches.clear()
    got = run(engine, {0: [(i, job(prompt[i:], 6)) for i in range(3)]})   # one prefill a step: rows 0, 1, 2 join
    assert [got[i] for i in range(3)] == [serial(m, tok, prompt[i:], 6) for i in range(3)]
    assert batches[:3] == [1, 2, 4]   # steps of 1, 2, then 4 rows (3 in use), fewer as replies end


def test_compiled_engine_replies_as_eager_and_compiles_only_in_its_warm_up(tok_dir, monkeypatch, dynamo_config):
    """serve.py --compile: the prefill blocks and the decode step of every row count compiled (captured by dynamo,
    run by its eager backend on a CPU), the cache views marked static; replies as the eager engine's. The warm-up
    compiles every graph and says so stage by stage; after it, prompts of any length (a token, a few: the recurrent
    GLA path, many; under 64 here, where the reference GLA unrolls 64-token chunks) and any number of rows in use
    compile nothing."""
    import functools
    from torch._dynamo.utils import counters
    m, tok = tiny("tiny"), tokenizer.Tokenizer(tok_dir)
    prompt = list(b"compiled rows, of every length up to this one")
    arrivals = lambda: {0: [(i, job(prompt[:n], 6)) for i, n in enumerate((1, 13, 3))],     # noqa: E731
                        4: [(3, job(prompt[:2], 9)), (4, job(prompt[:40], 5))], 9: [(5, job(prompt[:4], 5))],
                        12: [(6, job(prompt[:27], 4))], 30: [(7, job(prompt[:7], 3))]}
    want = run(serve.Engine(m, tok, max_batch=4, max_len=64), arrivals())
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    dynamo_config(recompile_limit=torch._dynamo.config.recompile_limit)   # the engine raises it: restored after
    err = io.StringIO()
    engine = serve.Engine(tiny("tiny"), tok, max_batch=4, max_len=64, compile=True, err=err)
    lines = err.getvalue().splitlines()
    assert engine.compiled and [line.split(" compiled in ")[0] for line in lines[1:-1]] == \
        ["warm-up: prefill", "warm-up: decode for 1 row", "warm-up: decode for 2 rows", "warm-up: decode for 4 rows"]
    assert lines[0].startswith("warm-up: compiling") and lines[-1].startswith("warm-up: done in")
    compiled = counters["frames"]["total"], counters["stats"]["unique_graphs"]
    assert run(engine, arrivals()) == want
    assert (counters["frames"]["total"], counters["stats"]["unique_graphs"]) == compiled
    torch._dynamo.reset()

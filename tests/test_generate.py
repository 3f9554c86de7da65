import io
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import bench
import convert
import generate
import tokenizer
import kernels
import spiking
from generate import Chat, Generator, prefill
from model import penalize, probs_of, sample
from model import GPT, Config

SPECIALS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok_dir):
    torch.manual_seed(0)
    m = GPT(Config.from_name("tiny"))
    out = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    convert.save_checkpoint(m, m.config, out, tok_dir)
    return out


def tiny(name, seed=0, n_layer=None):
    """A tiny preset in float64 (path differences stay far below logit gaps); n_layer: its first n layers (tiny-moe's
    first 2: a dense la+swa layer with sinks and an MoE la+fa one, each kind once, where compiling takes the time)."""
    torch.manual_seed(seed)
    return GPT(bench.first_layers(name, n_layer)).double().eval()


def greedy_full(model, ids, n, n_vocab=259, penalty=1.0):
    """Reference: no cache; the whole sequence through the model for every new token."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0][0, -1]
            for i in set(ids):                               # repetition penalty, one token at a time
                logits[i] = logits[i] / penalty if logits[i] > 0 else logits[i] * penalty
            ids.append(int(logits[:n_vocab].argmax()))
    return ids[len(ids) - n:]


def greedy(model, tok, **kw):
    return Generator(model, tok, temperature=0, stop=[], err=io.StringIO(), **kw)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-qwen"])
def test_greedy_with_cache_equals_full_forward(name, tok_dir):
    m, tok = tiny(name), tokenizer.Tokenizer(tok_dir)
    prompt = torch.randint(0, 259, (37,), generator=torch.Generator().manual_seed(1)).tolist()  # > 2 windows
    gen = greedy(m, tok, max_new_tokens=20, prefill_chunk=16)
    reply, stats = gen.extend(prompt, io.StringIO())
    assert reply == greedy_full(m, prompt, 20)
    assert stats["prefill_tokens"] == 37 and stats["decode_steps"] == 19
    assert gen.ids == prompt + reply and gen.fed == 56       # the last token waits for the next call


def test_repetition_penalty_covers_prompt_and_reply(tok_dir):
    m, tok = tiny("tiny"), tokenizer.Tokenizer(tok_dir)
    prompt = list(b"the the the")
    reply, _ = greedy(m, tok, max_new_tokens=12, repetition_penalty=1.5).extend(prompt, io.StringIO())
    assert reply == greedy_full(m, prompt, 12, penalty=1.5) != greedy_full(m, prompt, 12)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-qwen"])
def test_chunked_prefill_equals_one_shot(name):
    m = tiny(name)
    ids = torch.randint(0, 512, (2, 45), generator=torch.Generator().manual_seed(2))
    caches = [m.new_cache(2, 64) for _ in range(3)]
    last = [generate.prefill(m, c, ids, chunk) for c, chunk in zip(caches, (1000, 16, 7))]
    for lg, c in zip(last[1:], caches[1:]):
        torch.testing.assert_close(lg, last[0], atol=1e-6, rtol=1e-6)
        assert c.seen == caches[0].seen
        for a, b in zip(c.buffers(), caches[0].buffers()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_full_attention_cache_grows_and_keeps_its_slots():
    m = tiny("tiny-moe")                                     # la+fa layers and 4 sink tokens
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(3))
    small, big = m.new_cache(1, 4 + 20), m.new_cache(1, 4 + 64)
    generate.prefill(m, small, ids[:, :20], 8)
    generate.prefill(m, big, ids[:, :20], 8)
    small = generate.grown(m, small, 4 + 64)
    torch.testing.assert_close(generate.prefill(m, small, ids[:, 20:], 8), generate.prefill(m, big, ids[:, 20:], 8))


def test_stop_tokens_end_generation(tok_dir):
    m, tok = tiny("tiny"), tokenizer.Tokenizer(tok_dir)
    prompt = list(b"stop here")
    free = greedy_full(m, prompt, 12)
    j = next(j for j in range(2, 12) if free[j] not in free[:j])
    gen = greedy(m, tok, max_new_tokens=12)
    gen.stop = {free[j]}
    reply, _ = gen.extend(prompt, io.StringIO())
    assert reply == free[:j]                                 # the stop token itself is not part of the reply
    assert generate.stop_ids(tok, None) == [256, 258]
    assert generate.stop_ids(tok, ["<|im_start|>", "a"]) == [257, 97]
    with pytest.raises(ValueError, match="one token"):
        generate.stop_ids(tok, ["ab"])


def chat_ids(tok, text):
    return tok.encode_chat([dict(role="user", content=text)], add_generation_prompt=True)[0]


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen"])
def test_chat_turns_continue_the_cache(name, tok_dir):
    m, tok = tiny(name), tokenizer.Tokenizer(tok_dir)
    chat = Chat(greedy(m, tok, max_new_tokens=8), system="be brief")
    r1, _ = chat.turn("hello", io.StringIO())
    first_len = chat.gen.cache_len
    r2, s2 = chat.turn("and now?", io.StringIO())
    close = [258] + tok.encode("\n")
    before = tok.encode_chat([dict(role="system", content="be brief")])[0] + chat_ids(tok, "hello") + r1 + close \
        + chat_ids(tok, "and now?")
    assert chat.gen.ids == before + r2 + close
    assert r2 == greedy_full(m, before, len(r2))            # the cached conversation = a fresh full forward
    assert s2["prefill_tokens"] == 1 + len(close) + len(chat_ids(tok, "and now?"))   # only the new tokens
    if name == "tiny-qwen":                                  # full attention: the cache had to grow
        assert chat.gen.cache_len > first_len
    chat.reset()
    assert chat.gen.cache is None and chat.gen.ids == tok.encode_chat([dict(role="system", content="be brief")])[0]


def test_ctrl_c_stops_the_reply_not_the_session(tok_dir):
    m, tok = tiny("tiny"), tokenizer.Tokenizer(tok_dir)
    chat = Chat(greedy(m, tok, max_new_tokens=20))

    class CtrlCAfter3(io.StringIO):
        def write(self, s):
            if self.tell() == 2:                             # a byte tokenizer: one character per token here
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(s)
    r1, s1 = chat.turn("abc", CtrlCAfter3())
    assert s1["stopped"] and 3 <= len(r1) < 20
    r2, s2 = chat.turn("go on", io.StringIO())               # the session and its cache carry on
    assert not s2["stopped"]
    assert r2 == greedy_full(m, chat.gen.ids[:len(chat.gen.ids) - len(r2) - 2], len(r2))


def test_repl_through_stdin(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nsecond turn\n/reset\n\n/what\nthird\n/quit\nnever read\n"))
    generate.main(ckpt=ckpt, device="cpu", max_new_tokens=5, temperature=0)
    out, err = capsys.readouterr()
    assert err.count("[TTFT") == 3 and "(history cleared)" in err and "unknown command /what" in err
    assert out.count(">>> ") == 7                            # one prompt per line read, up to /quit


def test_one_shot_prompt_and_stdin(ckpt, monkeypatch, capsys):
    generate.main(ckpt=ckpt, device="cpu", prompt="Once", max_new_tokens=4, seed=3, top_k=5, top_p=0.9)
    out1, err = capsys.readouterr()
    assert "[TTFT" in err and "prefill 4 tok" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once"))
    generate.main(ckpt=ckpt, device="cpu", prompt="-", max_new_tokens=4, seed=3, top_k=5, top_p=0.9)
    assert capsys.readouterr()[0] == out1                    # same prompt, same seed: same text


def test_spiking_and_w8aspike_print_sparsity(ckpt, tmp_path, capsys):
    import spiking
    generate.main(ckpt=ckpt, device="cpu", prompt="spikes", max_new_tokens=3, spike=3.0)
    assert "[spikes: sparsity" in capsys.readouterr()[1]
    m, _ = convert.load(ckpt, "cpu", torch.float32)
    spiking.replace_linears(m, k=3.0, group_size=16)
    convert.save_checkpoint(m, m.config, str(tmp_path / "w8"), ckpt)
    generate.main(ckpt=str(tmp_path / "w8"), device="cpu", prompt="spikes", max_new_tokens=3)
    assert "[spikes: sparsity" in capsys.readouterr()[1]


def test_fp8_checkpoint_generates_as_quant_fp8(ckpt, tmp_path, capsys):
    """An FP8 checkpoint (convert.py fp8) runs without flags as --spike 3 --quant fp8 on its float source: the same
    greedy reply; --quant fp8 on it changes nothing; --quant int8 is refused by name."""
    convert.convert_fp8(ckpt=ckpt, out=str(tmp_path / "fp8"))
    capsys.readouterr()
    replies = []
    for args in (dict(ckpt=ckpt, spike=3.0, quant="fp8"), dict(ckpt=str(tmp_path / "fp8")),
                 dict(ckpt=str(tmp_path / "fp8"), quant="fp8")):
        generate.main(**args, device="cpu", prompt="Once", max_new_tokens=6, temperature=0, stop=[])
        out, err = capsys.readouterr()
        assert "[spikes: sparsity" in err
        replies.append(out)
    assert replies[0] == replies[1] == replies[2] and len(replies[0]) > 1
    with pytest.raises(ValueError, match=r"an FP8 checkpoint holds e4m3 weights already: quantize the float checkpoint"):
        generate.main(ckpt=str(tmp_path / "fp8"), device="cpu", prompt="Once", quant="int8")


def test_sampling_with_a_seed_is_deterministic(tok_dir):
    m, tok = tiny("tiny"), tokenizer.Tokenizer(tok_dir)
    replies = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        gen = Generator(m, tok, temperature=1.0, top_k=None, top_p=None, stop=[], max_new_tokens=20,
                        err=io.StringIO())
        replies.append(gen.extend(list(b"seed"), io.StringIO())[0])
    assert replies[0] == replies[1] != replies[2]


def test_top_k_top_p_temperature_and_penalty_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = p.log()
    torch.testing.assert_close(probs_of(logits, 1.0), p)
    torch.testing.assert_close(probs_of(logits, 1.0, top_k=2), torch.tensor([[0.625, 0.375, 0, 0]]))
    # top_p 0.85: 0.5 + 0.3 = 0.8 < 0.85, so 0.15 is needed too; 0.05 is not
    torch.testing.assert_close(probs_of(logits, 1.0, top_p=0.85), torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)
    # top_k 3 renormalizes to .526 .316 .158; then top_p 0.6 keeps two: .526 < .6 <= .842
    torch.testing.assert_close(probs_of(logits, 1.0, top_k=3, top_p=0.6), torch.tensor([[0.625, 0.375, 0, 0]]))
    s = p.sqrt()
    torch.testing.assert_close(probs_of(logits, 2.0), s / s.sum())
    torch.testing.assert_close(probs_of(logits, 1.0, top_p=0.3), torch.tensor([[1.0, 0, 0, 0]]))
    seen = torch.tensor([[True, True, False]])
    torch.testing.assert_close(penalize(torch.tensor([[2.0, -1.0, 0.5]]), seen, 2.0), torch.tensor([[1.0, -2.0, 0.5]]))
    draws = sample(logits.expand(2000, -1), 1.0, top_k=2)
    assert set(draws.flatten().tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.625) < 0.05
    assert sample(torch.tensor([[0.1, 3.0, 2.0]]), 0).item() == 1


def test_streaming_waits_for_whole_utf8_characters(tok_dir):
    tok, out = tokenizer.Tokenizer(tok_dir), io.StringIO()
    stream, seen = generate.TextStream(tok, out), []
    for b in "é€!".encode():                                 # c3 a9 | e2 82 ac | 21, one token per byte
        stream.put(b)
        seen.append(out.getvalue())
    stream.put(0xe2)                                         # a character cut short by the end of the reply
    stream.end()
    assert seen == ["", "é", "é", "é", "é€", "é€!"]
    assert out.getvalue() == "é€!\ufffd"


def test_errors_are_clear(ckpt, tmp_path, tok_dir):
    with pytest.raises(ValueError, match="empty prompt"):
        generate.main(ckpt=ckpt, device="cpu", prompt="")
    with pytest.raises(ValueError, match="max_seq_len"):
        generate.main(ckpt=ckpt, device="cpu", prompt="x" * 4096)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        generate.main(ckpt=str(tmp_path / "nope"), device="cpu", prompt="hi")
    with pytest.raises(FileNotFoundError, match="neither config.yaml"):
        generate.main(ckpt=str(tmp_path), device="cpu", prompt="hi")
    bad = str(tmp_path / "bad")
    shutil.copytree(ckpt, bad)
    with open(os.path.join(bad, "model.safetensors"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        generate.main(ckpt=bad, device="cpu", prompt="hi")
    gen = greedy(tiny("tiny"), tokenizer.Tokenizer(tok_dir))
    with pytest.raises(ValueError, match="empty prompt"):
        gen.extend([], io.StringIO())
    with pytest.raises(ValueError, match="top_p"):
        generate.main(ckpt=ckpt, device="cpu", prompt="hi", top_p=1.5)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--ckpt", str(tmp_path / "nope"),
                        "--prompt", "hi"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_release_directory_generates_directly(ckpt, tok_dir, tmp_path, capsys):
    rel = str(tmp_path / "release")
    convert.convert_release(src=ckpt, out=rel, to="release")          # Hugging Face layout: config.json
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        generate.main(ckpt=rel, device="cpu", prompt="Once")
    capsys.readouterr()
    replies = []
    for args in (dict(ckpt=ckpt), dict(ckpt=rel, tokenizer=tok_dir)):   # the same weights: the same greedy reply
        generate.main(**args, device="cpu", prompt="Once", max_new_tokens=6, temperature=0, stop=[])
        replies.append(capsys.readouterr()[0])
    assert replies[0] == replies[1] and len(replies[0]) > 1


# ----------------------------------------------------------------------------- --cp: the prompt's prefill split

CP_PROMPT = "The quick brown fox jumps over the lazy dog, then it runs far into the hills."   # > 4 windows of 16


@pytest.fixture(scope="module")
def ascii_ckpts(tmp_path_factory):
    """tiny (gla / swa) and tiny-moe (4 sinks, la+swa / la+fa, MoE) checkpoints whose tokenizer has one token per
    printable ASCII character and nothing else: the printed reply spells its tokens out, one character each."""
    d = tmp_path_factory.mktemp("cp")
    tokenizer.save(str(d / "tok"), {bytes([c]): i for i, c in enumerate(range(32, 127))},
                   {"<|endoftext|>": 95, "<|im_start|>": 96, "<|im_end|>": 97})
    for name in ("tiny", "tiny-moe"):
        torch.manual_seed(0)
        m = GPT(Config.from_name(name))
        convert.save_checkpoint(m, m.config, str(d / name), str(d / "tok"))
    return {name: str(d / name) for name in ("tiny", "tiny-moe")}


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_split_prefill_prints_one_process_reply(name, ascii_ckpts, capfd):
    """--cp 2 and 3 (gloo processes): the last rank's cache holds the whole prompt and its greedy reply, printed by
    it alone with one statistics line, is one process's, also with the prompt in rounds (prefill_chunk 5: about 10
    tokens a round over 2 processes, 15 over 3); with a seed, so is a sampled one (tiny)."""
    kw = dict(ckpt=ascii_ckpts[name], device="cpu", dtype="float64", prompt=CP_PROMPT, max_new_tokens=12, stop=[])
    runs = ([dict(temperature=0, cp=3), dict(temperature=0, cp=2, prefill_chunk=5), dict(seed=3, cp=2)]
            if name == "tiny" else [dict(temperature=0, cp=2), dict(temperature=0, cp=3, prefill_chunk=5)])
    for run in runs:
        generate.main(**kw, **{**run, "cp": 1})
        one = capfd.readouterr()[0]
        generate.main(**kw, **run)
        out, err = capfd.readouterr()
        assert out == one and len(out) == 13, (run, out, one)
        assert err.startswith("loaded ") and err.count("loaded ") == err.count("[TTFT") == 1, err
        assert f"prefill {len(CP_PROMPT)} tok" in err, err


def test_split_prefill_refusals(ascii_ckpts):
    kw = dict(ckpt=ascii_ckpts["tiny"], device="cpu")
    with pytest.raises(ValueError, match="--prompt - to read stdin\\), or drop --cp to chat"):
        generate.main(**kw, cp=2)
    with pytest.raises(ValueError, match="the prompt is 2 tokens: --cp 3 splits"):
        generate.main(**kw, prompt="ab", cp=3)
    with pytest.raises(ValueError, match="drop --compile"):
        generate.main(**kw, prompt="abc", cp=2, compile=True)
    with pytest.raises(ValueError, match="cp=0"):
        generate.main(**kw, prompt="abc", cp=0)
    n = max(2, torch.cuda.device_count() + 1)   # refused before any process starts: a machine without CUDA checks it
    with pytest.raises(ValueError, match=f"--cp {n} needs {n} GPUs, one a process; {torch.cuda.device_count()} vis"):
        generate.main(ckpt=ascii_ckpts["tiny"], device="cuda", prompt="abcdefgh", cp=n)
    with pytest.raises(ValueError, match="the prompt makes the sequence 4096 tokens long"):
        generate.main(**kw, prompt="x" * 4096, cp=2)
    # refused inside the ranks (each builds its FP8 layers, which need spiking activations): one line, no hang
    r = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--ckpt", ascii_ckpts["tiny"], "--device",
                        "cpu", "--prompt", "-", "--cp", "2", "--quant", "fp8"], input=CP_PROMPT, capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and r.stdout == "", r
    lines = [line for line in r.stderr.splitlines() if not line.startswith("loaded ")]   # the last rank's, if first
    assert lines == ["error: FP8 layers multiply spike counts: give a spike k > 0 (generate.py --spike K)"], r.stderr


@pytest.mark.parametrize("name,quant", [("tiny", None), ("tiny-qwen", None), ("tiny-moe", None),
                                        ("tiny-moe", "int8"), ("tiny-moe", "w8aspike"), ("tiny-moe", "fp8")])
def test_decode_step_compiles_to_one_graph(name, quant):
    """GPT.forward with input_pos (generate.py's decode step) is one graph for every position and cache (with MoE
    layers too, float or 8-bit experts: each step's routing inside it, and no op whose output shape depends on it,
    such as nonzero, for which CUDA graphs would record a new graph at every new size), and its logits are the
    eager model's (the graph's experts gathered, the eager loop's picked by nonzero)."""
    from torch._dynamo.utils import counters
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    m, data_dependent = tiny(name), set()
    if quant:
        m = {"int8": lambda: spiking.quantize_int8(m, group_size=16), "fp8": lambda: spiking.replace_linears_fp8(m),
             "w8aspike": lambda: spiking.replace_linears(m, group_size=16)}[quant]()

    def backend(gm, _):   # graph capture, no codegen
        data_dependent.update(str(n.target) for n in gm.graph.nodes
                              if free_unbacked_symbols(n.meta.get("example_value")))
        return gm.forward
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(m.forward, backend=backend, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):                                   # a second cache object must not recompile either
            cache, eager = m.new_cache(1, 64), m.new_cache(1, 64)
            logits = generate.prefill(m, cache, torch.tensor([[1, 2, 3]]), 16)
            generate.prefill(m, eager, torch.tensor([[1, 2, 3]]), 16)
            for _ in range(4):
                tok = logits.argmax(-1, keepdim=True)
                logits = step(tok, cache=cache, input_pos=torch.full((1, 1), cache.seen), last_only=True)[0][:, -1]
                ref = m(tok, cache=eager, input_pos=torch.full((1, 1), eager.seen), last_only=True)[0][:, -1]
                torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
                cache.seen += 1
                eager.seen += 1
    assert counters["stats"]["unique_graphs"] == 1 and not data_dependent, data_dependent


def test_bench_code_paths_on_cpu(capsys):
    bench.bench_ttft(tiny=True, sweep=(64, 256))   # (bench.py decode --tiny true: a README command, test_readme.py)
    bench.bench_profile(preset="tiny", n_layer=2, seq_len=64, chunk=32, rows=5, device="cpu")
    bench.bench_profile(preset="tiny", n_layer=2, seq_len=64, chunk=32, rows=5, device="cpu", quant="w8aspike")
    out = capsys.readouterr()[0]
    assert "tiny-qwen" in out and "floor" in out and "with chunk 256" in out
    assert "## training step: tiny" in out and "## prefill: a chunk of 32 after 32, layers gla + swa" in out
    assert "## decode: 16 steps after 64 tokens, batch 1, layers gla + swa, eager, bf16" in out
    assert "## decode: 16 steps after 64 tokens, batch 1, layers gla + swa, eager, w8aspike" in out


@pytest.mark.parametrize("name,quant", [("tiny-qwen", None), ("tiny-moe", "w8aspike")])
def test_compiled_generation_equals_eager(name, quant, tok_dir, monkeypatch):
    """Greedy tokens of the compiled prefill and decode step (graph capture, no code generation) equal eager's: full
    attention, whose compiled step meets a grown cache, and MoE layers with 8-bit experts (the decode step's experts
    gathered, the eager loop's picked by nonzero). The decode step alone, float, int8 and FP8 experts too:
    test_decode_step_compiles_to_one_graph; the tokens of float experts in the GPU suite
    (test_gpu_compiled_generation_equals_eager)."""
    import functools
    m, tok = tiny(name, n_layer=2 if quant else None), tokenizer.Tokenizer(tok_dir)
    if quant:
        m = spiking.replace_linears_fp8(m) if quant == "fp8" else spiking.replace_linears(m, group_size=16)
    prompt = list(b"compile me")
    eager, _ = greedy(m, tok, max_new_tokens=12).extend(prompt, io.StringIO())
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))   # capture, no codegen
    err = io.StringIO()
    gen = Generator(m, tok, temperature=0, stop=[], max_new_tokens=12, compile=True, err=err)
    assert "compiled the prefill and the decode step" in err.getvalue()
    assert gen.extend(prompt, io.StringIO())[0] == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,split_bias", [("tiny", True), ("tiny-qwen", True), ("tiny-moe", True),
                                             ("tiny-moe", False)])
def test_gpu_compiled_generation_equals_eager(name, split_bias, tok_dir, monkeypatch):
    """On CUDA, float32: compiled blocks (flex prefill past 128 tokens, Triton GLA) and the decode step compiled
    with CUDA graphs and tuned matrix-vector reductions (generate.compile_decode) give the eager greedy tokens,
    over two turns (the second extends the cache the first left); with q, k and v's bias after their GEMV
    (kernels.use_split_bias) and, for one model, inside cuBLAS's addmm."""
    monkeypatch.setattr(kernels, "GEMV_SPLIT_BIAS", split_bias)
    m, tok = tiny(name).float().cuda(), tokenizer.Tokenizer(tok_dir)
    turns = [list(bytes(range(32, 232))), list(b"and then")]                 # 200 tokens, then 8 more
    ref = greedy(m, tok, max_new_tokens=10)
    eager = [ref.extend(t, io.StringIO())[0] for t in turns]
    torch._dynamo.reset()
    gen = Generator(m, tok, temperature=0, stop=[], max_new_tokens=10, compile=True, err=io.StringIO())
    assert [gen.extend(t, io.StringIO())[0] for t in turns] == eager


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_compiled_blocks_equal_eager(name, monkeypatch):
    """kernels.compile_blocks (generate.py's and train.py's compiled, checkpointed blocks): chunked prefill through the cache and a
    training step's loss and gradients equal the eager model's, with the graph breaks around the GLA kernels (when
    the interpreter runs them) and the flex_attention SWA prefill; tiny-moe's masked attention (sinks) leaves the
    compiled prefill for the host-built block mask, never in training."""
    import copy
    import functools

    outside, run_outside = [], kernels._masked_attention_outside
    monkeypatch.setattr(kernels, "_masked_attention_outside", lambda *a: outside.append(1) or run_outside(*a))
    monkeypatch.setattr(kernels, "ATTN_IMPL", "flex")
    if kernels.INTERPRET:
        monkeypatch.setattr(kernels, "GLA_IMPL", "triton")
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    m = tiny(name, n_layer=2).float()
    ids = torch.randint(0, 259, (1, 45), generator=torch.Generator().manual_seed(2))
    ref = prefill(m, m.new_cache(1, 64), ids, 16)
    mc = copy.deepcopy(m)
    kernels.compile_blocks(mc)
    for _ in range(2):                          # the second run reuses the compiled graphs
        torch.testing.assert_close(prefill(mc, mc.new_cache(1, 64), ids, 16), ref, rtol=1e-5, atol=1e-5)
    assert bool(outside) == (name == "tiny-moe")
    outside.clear()
    m.train(), mc.train()
    monkeypatch.setattr(kernels, "ATTN_IMPL", "auto")  # flex has no backward on CPU: training takes the dense mask
    kernels.checkpoint_blocks(mc)
    x = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(3))
    losses = []
    for net in (m, mc):
        _, loss, aux = net(x, x)
        (loss + aux).backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(m.named_parameters(), mc.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert not outside

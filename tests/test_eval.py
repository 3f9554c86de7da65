"""eval.py: the spike sweep (baseline first, spike_k restored afterwards) and the `spikes` command on float and
W8ASpike checkpoints, with its user errors; the lm-evaluation-harness LM against float64 sums and a local task end to
end (skipped without lm-eval); the recall suite's generator, scoring, table, JSON and PNG."""
import copy
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import convert
import tokenizer
from eval import spike_sweep, spikes
from model import GPT, Config, Linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(Config.from_name("tiny", **kw)).eval()


def test_spike_sweep_core():
    model = _tiny()
    rows = torch.randint(0, 512, (3, 17), generator=torch.Generator().manual_seed(7))
    res = spike_sweep(model, rows, [2.0, 4.0], batch_size=2)
    assert [r["k"] for r in res] == [None, 2.0, 4.0] and res[0]["dppl"] == 0.0
    for r in res[1:]:
        assert r["dppl"] == pytest.approx(r["ppl"] - res[0]["ppl"])
        assert 0 <= r["sparsity"] <= 1 and 0 <= r["silent"] <= 1 and r["saving_vs_fp16"] > r["saving_vs_int8"]
    assert model.config.spike_k is None and all(m.spike_k is None for m in model.modules() if isinstance(m, Linear))
    spiky = _tiny(spike_k=3.0)                                         # a spiking model comes back spiking
    spike_sweep(spiky, rows, [2.0], batch_size=2)
    assert spiky.config.spike_k == 3.0 and all(m.spike_k == 3.0 for m in spiky.modules() if isinstance(m, Linear))
    for ks in ([0.0], [2.0, -1.0], [None]):
        with pytest.raises(ValueError, match="k"):
            spike_sweep(model, rows, ks)


def checkpoint(tmp_path):
    """A tiny float checkpoint with a bytes-only tokenizer, and a text to measure on."""
    tok_dir = str(tmp_path / "tok")
    tokenizer.save(tok_dir, {bytes([i]): i for i in range(256)}, {"<|endoftext|>": 256})
    model = _tiny()
    convert.save_checkpoint(model, model.config, str(tmp_path / "ckpt"), tok_dir)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    return str(tmp_path / "ckpt"), str(text)


def test_spikes_on_float_and_w8aspike_checkpoints(tmp_path, capsys):
    ckpt, text = checkpoint(tmp_path)
    spikes(ckpt=ckpt, text=text, k=[2.0, 3.0], seq_len=32, max_tokens=256)
    lines = capsys.readouterr().out.splitlines()
    assert "sparsity@3" in lines[1] and lines[3].split()[0] == "off"
    assert [ln.split()[0] for ln in lines[4:6]] == ["2", "3"]
    convert.convert_w8aspike(ckpt=ckpt, out=str(tmp_path / "q"), text=text, group_size=32, n_samples=4, seq_len=32)
    capsys.readouterr()
    spikes(ckpt=str(tmp_path / "q"), text=text, k=[3.0], seq_len=32, max_tokens=256, dtype="float64")
    assert len(capsys.readouterr().out.splitlines()) == 5
    convert.convert_fp8(ckpt=ckpt, out=str(tmp_path / "fp8"))         # no run without spikes: refused by name
    with pytest.raises(ValueError, match="is an FP8 checkpoint, whose layers take spike counts only: .* float checkpoint"):
        spikes(ckpt=str(tmp_path / "fp8"), text=text, k=[3.0], seq_len=32, max_tokens=256)


def test_spikes_user_errors(tmp_path):
    ckpt, text = checkpoint(tmp_path)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 na\u00efve".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    for kw, err, msg in [(dict(k=[3.0, 0.0]), ValueError, "k=0.0 must be > 0"),
                         (dict(coding="binary"), ValueError, "unsigned"),
                         (dict(text=str(tmp_path / "empty.txt")), ValueError, "empty.txt gives 0 tokens"),
                         (dict(text=str(tmp_path / "none.txt")), FileNotFoundError, "none.txt"),
                         (dict(ckpt=str(tmp_path)), FileNotFoundError, "not a checkpoint directory"),
                         (dict(tokenizer=str(tmp_path)), FileNotFoundError, "no tokenizer in"),
                         (dict(dtype="half"), ValueError, "dtype 'half'")]:
        with pytest.raises(err, match=msg):
            spikes(**{**dict(ckpt=ckpt, text=text, seq_len=16), **kw})
    # the command line: one line on stderr, no traceback, as generate.py and convert.py
    for cmd, msg in [(["spikes", "--ckpt", str(tmp_path / "nope"), "--text", text], "not a checkpoint directory"),
                     (["spikes", "--ckpt", ckpt, "--text", str(latin)], f"{latin} is not UTF-8")]:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *cmd], capture_output=True, text=True,
                           cwd=ROOT)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


# ----------------------------------------------------------------------------- lm-evaluation-harness adapter

def test_eval_imports_only_the_library():
    """eval.py is an entry point: it imports library modules, and lm-eval only inside the lm command."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, "eval.py")).read())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names} | \
          {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    ours = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert top & ours <= {"convert", "model", "kernels", "spiking", "tokenizer"}, top & ours
    assert "lm_eval" not in top


def _bytes_tok(tmp_path):
    tokenizer.save(str(tmp_path / "tok"), {bytes([i]): i for i in range(256)}, {"<|endoftext|>": 256})
    return tokenizer.Tokenizer(str(tmp_path / "tok"))


def _ref_loglik(model64, ids, n):
    """float64: sum of log p(ids[j] | ids[:j]) over the last n tokens, and whether each is the argmax."""
    logits = model64(torch.tensor([ids[:-1]]))[0][0]
    logp = logits.log_softmax(-1)[len(ids) - 1 - n:]
    y = torch.tensor(ids[len(ids) - n:])
    return logp.gather(-1, y[:, None]).sum().item(), bool((logits[len(ids) - 1 - n:].argmax(-1) == y).all())


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_lm_loglikelihoods_equal_float64_sums(tmp_path, preset):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from eval import lm_class
    torch.manual_seed(1)
    tok, model = _bytes_tok(tmp_path), GPT(Config.from_name(preset)).eval()   # tiny-moe: sinks, la+fa, MoE
    model64 = copy.deepcopy(model).double()
    pairs = [("The quick brown fox", " jumps over the lazy dog"), ("", "no context at all"),
             ("A context longer than the window of 48 tokens. " * 3 + "So", " its start is cut"), ("x", "y"),
             ("Question: 2 + 2?\nAnswer:", " 4")]
    eos, L = tok.eos_id, 48
    want = []
    for ctx, cont in pairs:
        c, n = (tok.encode(ctx) or [eos]), tok.encode(cont)
        want.append(_ref_loglik(model64, (c + n)[-(L + 1):], len(n)))
    text = "Perplexity in rolling windows: every token is predicted once. " * 3
    windows = map(make_disjoint_window, get_rolling_token_windows(tok.encode(text), eos, L, 1))
    want_rolling = sum(_ref_loglik(model64, c + n, len(n))[0] for c, n in windows)
    for chunk in (4096, 7):   # one forward; the cache in chunks of 7 (the unscored prefix without logits)
        lm = lm_class()(model, tok, batch_size=3, max_length=L, prefill_chunk=chunk)
        got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
        for (lp, greedy), (lp_ref, greedy_ref) in zip(got, want):
            assert lp == pytest.approx(lp_ref, rel=1e-5) and greedy == greedy_ref
        rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
        assert rolling[0] == pytest.approx(want_rolling, rel=1e-5)
    whole = lm_class()(model, tok, max_length=4096).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)   # one window: all after <eos>
    assert whole[0] == pytest.approx(_ref_loglik(model64, [eos] + tok.encode(text), len(text))[0], rel=1e-5)


def test_lm_generate_until_is_greedy_decoding_with_stop_strings(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from eval import lm_class
    tok, model = _bytes_tok(tmp_path), _tiny(2)
    model64, ids = copy.deepcopy(model).double(), tok.encode("Once upon a time")
    for _ in range(12):   # float64 greedy over the tokenizer's ids, whole sequence each step
        ids.append(int(model64(torch.tensor([ids]))[0][0, -1, :tok.n_vocab].argmax()))
    ref = tok.decode(ids[-12:])
    stop = ref[6:8]
    lm = lm_class()(model, tok, prefill_chunk=5)
    req = lambda kw: Instance("generate_until", {}, ("Once upon a time", kw), 0)
    out = lm.generate_until([req({"until": [stop], "max_gen_toks": 12}), req({"until": ["\x00"], "max_gen_toks": 12}),
                             req({"until": [], "max_gen_toks": 3})], disable_tqdm=True)
    assert out == [ref[:ref.find(stop)], ref, ref[:3]]
    sampled = []
    for _ in range(2):
        torch.manual_seed(0)
        sampled += lm.generate_until([req({"do_sample": True, "temperature": 1.0, "top_k": 50, "until": [],
                                           "max_gen_toks": 8})], disable_tqdm=True)
    assert sampled[0] == sampled[1] and len(sampled[0]) <= 8   # bytes: at most one character each


def _mc_task(tmp_path, docs):
    """A multiple-choice task read from a local jsonl (lm-eval's dataset_path: json)."""
    with open(tmp_path / "mc.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(f"""task: sb_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
  cache_dir: {tmp_path / 'hf'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return str(tmp_path / "tasks")


def test_local_multiple_choice_task_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager
    from eval import lm, lm_class
    docs = [dict(question=f"What is {a} plus {b}?", choices=[str(a + b), str(a * b), f"{a}{b}"], answer=i % 3)
            for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)])]
    tasks = _mc_task(tmp_path, docs)
    tok, model = _bytes_tok(tmp_path), _tiny(3)
    model64 = copy.deepcopy(model).double()
    right = 0
    for d in docs:   # lm-eval's acc: the choice of highest log-likelihood is the target
        ctx = tok.encode(f"Question: {d['question']}\nAnswer:")
        lls = [_ref_loglik(model64, ctx + tok.encode(" " + c), len(tok.encode(" " + c)))[0] for c in d["choices"]]
        right += max(range(3), key=lls.__getitem__) == d["answer"]
    res = lm_eval.simple_evaluate(model=lm_class()(model, tok, batch_size=4), tasks=["sb_tiny_mc"], bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=tasks, include_defaults=False))
    assert res["results"]["sb_tiny_mc"]["acc,none"] == pytest.approx(right / len(docs))
    # the command: offline, tasks only from --include_path; lm-eval's own need --hub true (checked before loading)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['mmlu'\].*--hub true"):
        lm(ckpt=str(tmp_path / "none"), tasks=["mmlu"], include_path=[tasks])
    ckpt, _ = checkpoint(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "lm", "--ckpt", ckpt, "--tasks",
                        "[sb_tiny_mc]", "--include_path", f"[{tasks}]", "--limit", "4", "--device", "cpu", "--out",
                        str(tmp_path / "res"), "--spike", "3"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(spike k=3): sb_tiny_mc" in r.stdout and re.search(r"\|sb_tiny_mc\s*\|.*\|acc\s*\|", r.stdout)
    assert json.load(open(tmp_path / "res" / "results.json"))["results"]["sb_tiny_mc"]["sample_len"] == 4


# ----------------------------------------------------------------------------- long-context recall

def _copier(tok):
    """A stand-in model that reads the answer off the prompt, as perfect recall would."""
    def answer(prompt, n):
        if "pass key" in prompt:
            vals = [re.search(r"The pass key is (\d+)\.", prompt)[1]]
        elif "special magic number" in prompt:
            key = re.search(r"magic number for (\w+) mentioned", prompt)[1]
            vals = [re.search(rf"numbers for {key} is: (\d+)\.", prompt)[1]]
        else:
            keys = prompt.rsplit("Numbers of ", 1)[1][:-1].split(", ")
            vals = [re.search(rf"^{k}: (\d+)$", prompt, re.M)[1] for k in keys]
        text = " " + " ".join(vals)
        assert len(tok.encode(text)) <= n   # max_new_tokens leaves room for the answer
        return text + ".\n"
    return answer


def test_recall_generator_is_deterministic_and_fits(tmp_path):
    from eval import RECALL_TASKS, recall_sample
    tok = _bytes_tok(tmp_path)
    for task in RECALL_TASKS:
        for depth in (0, 50, 100):
            a, b = (recall_sample(tok, task, 900, depth, 0, 0) for _ in range(2))
            assert a == b and a["prompt"] != recall_sample(tok, task, 900, depth, 1, 0)["prompt"]
            assert a["prompt"] != recall_sample(tok, task, 900, depth, 0, 1)["prompt"]
            n = len(tok.encode(a["prompt"]))
            assert 900 - a["max_new_tokens"] - 25 <= n <= 900 - a["max_new_tokens"]
            v = a["values"][0]
            at = a["prompt"].find(v) / len(a["prompt"])   # where the (first asked) needle sits
            assert abs(at - depth / 100) < 0.25, (task, depth, at)
    s = recall_sample(tok, "multikey", 900, 0, 0, 0, n_keys=6)
    assert len(s["choices"]) == 6 and s["values"][0] in s["choices"] and s["prompt"].count(s["values"][0]) == 1
    s = recall_sample(tok, "mqar", 900, 100, 0, 0, n_queries=3)
    assert len(s["values"]) == 3 and len(set(s["choices"])) == len(s["choices"]) > 30
    with pytest.raises(ValueError, match="length 200 is too short for a multikey prompt"):
        recall_sample(tok, "multikey", 200, 50, 0, 0)
    with pytest.raises(ValueError, match="recall task 'niah'"):
        recall_sample(tok, "niah", 900, 50, 0, 0)


def test_recall_scoring_copier_perfect_guesser_at_chance(tmp_path):
    from eval import RECALL_TASKS, recall_grid, recall_sample, recall_score
    assert recall_score(" 12345.", ["12345"]) == 1 and recall_score(" 1234", ["12345"]) == 0
    assert recall_score("", ["1"]) == 0 and recall_score(" 1 2 9 4", ["1", "2", "3", "4"]) == 0.75
    tok, lengths, depths = _bytes_tok(tmp_path), [700, 1000], [0, 50, 100]
    grid = recall_grid(_copier(tok), tok, RECALL_TASKS, lengths, depths, samples=3)
    assert all(a == 1.0 for t in RECALL_TASKS for row in grid[t] for a in row), grid
    rng = random.Random(0)
    guess = lambda prompt, n: " ".join(rng.choice(re.findall(r"\d+", prompt)) for _ in range(4))
    n = 20
    grid = recall_grid(guess, tok, ["multikey", "mqar"], lengths, depths, samples=n)
    for t, trials in (("multikey", 1), ("mqar", 4)):
        chance = np.mean([1 / len(recall_sample(tok, t, L, dp, 0, i)["choices"])
                          for L in lengths for dp in depths for i in range(n)])
        acc, sd = np.mean(grid[t]), math.sqrt(chance * (1 - chance) / (n * len(lengths) * len(depths) * trials))
        assert abs(acc - chance) < 4 * sd, (t, acc, chance)
    digits = lambda prompt, n: " %05d" % rng.randrange(100000)
    assert np.max(recall_grid(digits, tok, ["passkey"], lengths, depths, samples=n)["passkey"]) == 0


def _read_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind], pos = chunks.get(kind, b"") + body, pos + 12 + n
    W, H, bits, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (bits, color) == (8, 2) and b"IEND" in chunks
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(H, 1 + 3 * W)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(H, W, 3)


def test_recall_command_table_json_and_png(tmp_path, capsys):
    from eval import heatmap, recall, write_png
    img = heatmap([[1.0, 0.0], [0.5, 0.25]], [1024, 1 << 17], [0, 100], zoom=1)
    write_png(tmp_path / "h.png", img)
    assert (_read_png(tmp_path / "h.png") == img).all()
    assert tuple(img[21, 49]) == (0, 255, 64) and tuple(img[21, 89]) == (255, 0, 64)   # cell corners: green, red
    ckpt, _ = checkpoint(tmp_path)
    recall(ckpt=ckpt, lengths=[700, 900], depths=[0, 100], samples=1, tasks=["passkey", "mqar"],
           out=str(tmp_path / "r"), device="cpu")
    out = capsys.readouterr().out.splitlines()
    assert "0%" in out[1] and "100%" in out[1] and out[3].startswith("700 tokens") and len(out[3].split()) == 4
    res = json.load(open(tmp_path / "r" / "recall.json"))
    assert res["lengths"] == [700, 900] and np.array(res["accuracy"]["mqar"]).shape == (2, 2)
    assert _read_png(tmp_path / "r" / "recall-passkey.png").shape[2] == 3
    for kw, msg in [(dict(lengths=[5000]), "longer than tiny's limit config.max_seq_len=4096"),
                    (dict(tasks=["ruler"]), "recall tasks"), (dict(depths=[120]), "0..100")]:
        with pytest.raises(ValueError, match=msg):
            recall(**{**dict(ckpt=ckpt, samples=1, device="cpu"), **kw})


def test_recall_data_writes_training_documents(tmp_path, capsys):
    from eval import recall_data
    tokenizer.save(str(tmp_path / "tok"), {bytes([i]): i for i in range(256)}, {"<|endoftext|>": 256})
    for name in ("a.jsonl", "b.jsonl"):
        recall_data(tokenizer=str(tmp_path / "tok"), out=str(tmp_path / name), n=12, lengths=[700, 900])
    docs = [json.loads(line)["text"] for line in open(tmp_path / "a.jsonl")]
    assert len(docs) == 12 and open(tmp_path / "a.jsonl").read() == open(tmp_path / "b.jsonl").read()
    assert all(len(d.encode()) <= 900 and re.search(r" \d{5}$", d) for d in docs)   # prompt + answer, bytes = tokens
    assert {d[:12] for d in docs} == {"There is an ", "Some special", "Memorize the"}   # every task drawn
    assert "wrote" in capsys.readouterr().out and not os.path.exists(tmp_path / "a.jsonl.tmp")

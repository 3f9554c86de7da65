"""train.py on CPU: data preparation and packing, SFT loss masks, the training loop (the loss falls, a resumed run
repeats an uninterrupted one exactly), clear errors, FSDP over two processes, the dry-run plan, every config."""
import glob
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from model import GPT, Config
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = ROOT / "assets" / "tokenizer"
EOS = "<|endoftext|>"


def scalars(out_dir, tag="train/loss"):
    """[{step: value}] per TensorBoard run under out_dir/logs, oldest first (a resumed run writes a new version)."""
    runs = []
    for d in sorted(glob.glob(str(Path(out_dir) / "logs" / "version_*")), key=lambda d: int(d.rsplit("_", 1)[1])):
        ea = EventAccumulator(d)
        ea.Reload()
        runs.append({e.step: e.value for e in ea.Scalars(tag)} if tag in ea.Tags()["scalars"] else {})
    return runs


def run(data_dir, out_dir, model="tiny", model_config=None, data=None, init_from=None, **train_kw):
    args = dict(seq_len=32, micro_batch_size=2, global_batch_size=4, max_steps=6, lr=3e-3, min_lr=3e-4,
                warmup_steps=2, log_interval=1, save_interval=3)
    train.main(model=model, model_config=model_config or {"vocab_size": 2048}, tokenizer_dir=TOK, out_dir=out_dir,
               data=data or train.DataArgs(path=data_dir), train=train.TrainArgs(**{**args, **train_kw}),
               eval=train.EvalArgs(interval=1000, max_batches=1, sample_tokens=0), precision="32-true",
               accelerator="cpu", init_from=init_from)


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "pydoc"
    train.prepare(inputs=["pydoc"], out=out, tokenizer_dir=TOK, val_fraction=0.1)
    return out


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- tokenizer and data

def test_shipped_tokenizer_is_rebuilt_by_its_command(tmp_path):
    train.build_tokenizer(out=tmp_path / "tok")
    for f in ("tokenizer.tiktoken", "tokenizer.json"):
        assert (tmp_path / "tok" / f).read_bytes() == (TOK / f).read_bytes()
    tok = Tokenizer(TOK)
    assert tok.n_vocab == 2048 and sorted(tok.special_tokens.values()) == [2045, 2046, 2047]
    text = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
    assert tok.decode(tok.encode(text)) == text


def test_prepare_writes_documents_in_order_with_eos_and_val_split(tmp_path):
    docs = ["First document. " * 5, "Second one, longer: " * 9, "Third.", "Fourth document here. " * 3]
    files = [write(tmp_path / "a.txt", docs[0]), write(tmp_path / "b.md", docs[1]),
             write(tmp_path / "c.jsonl", json.dumps({"text": docs[2]}) + "\n\n" + json.dumps({"text": docs[3]}) + "\n")]
    tok = Tokenizer(TOK)
    want = [tok.encode(d) + [tok.eos_id] for d in docs]
    for shard_tokens, name in ((1 << 20, "one"), (30, "many")):
        out = tmp_path / name
        train.prepare(inputs=files, out=out, tokenizer_dir=TOK, val_fraction=0.5, shard_tokens=shard_tokens)
        for split, idx in (("train", [0, 2]), ("val", [1, 3])):   # every 2nd document validates
            shards = sorted(out.glob(f"{split}-*.bin"))
            tokens = np.concatenate([np.fromfile(s, np.uint32) for s in shards])
            assert tokens.tolist() == sum((want[i] for i in idx), [])
            starts = [np.fromfile(s.with_suffix(".idx"), np.int64).tolist() for s in shards]
            assert sum(len(s) - 1 for s in starts) == 2 and all(s[0] == 0 for s in starts)
        assert len(list(out.glob("train-*.bin"))) == (1 if name == "one" else 2)
        assert not list(out.glob("*.mask"))                   # no chat data, no masks
    again = tmp_path / "again"
    train.prepare(inputs=files, out=again, tokenizer_dir=TOK, val_fraction=0.5)
    for f in (tmp_path / "one").iterdir():                     # deterministic to the byte
        assert (again / f.name).read_bytes() == f.read_bytes()


def test_packed_rows_and_epoch_order(pydoc):
    data = train.Packed(pydoc, "train", 64, Tokenizer(TOK))
    tokens = np.fromfile(pydoc / "train-00000.bin", np.uint32)
    x, y, doc = data.row(3)
    assert x.tolist() == tokens[3 * 64:4 * 64].tolist()
    keep = y != -100
    assert (y[keep] == tokens[3 * 64 + 1:4 * 64 + 1][keep]).all()
    n = len(data)
    epoch = [r for it in range(n // 4) for rank in range(2) for r in train.train_rows(n, it, rank, 2, 2, seed=5)]
    assert len(set(epoch)) == len(epoch) == n // 4 * 4         # within an epoch no row repeats, across ranks too
    assert train.train_rows(n, 7, 1, 2, 2, seed=5) == train.train_rows(n, 7, 1, 2, 2, seed=5)
    assert train.train_rows(n, 7, 1, 2, 2, seed=5) != train.train_rows(n, 7, 1, 2, 2, seed=6)


def test_packing_a_token_never_sees_the_previous_document(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer(TOK)
    A = "Short first document about lists."
    B = ("The second document is longer, so that the sliding window of the tiny preset (16 tokens) matters: "
         "while loops, for loops, generators and comprehensions all iterate.")
    files = [write(tmp_path / f"{i}.txt", t) for i, t in enumerate([A, B, "validation text"])]
    train.prepare(inputs=files, out=tmp_path / "d", tokenizer_dir=TOK, val_fraction=0.34)
    a, b = tok.encode(A) + [tok.eos_id], tok.encode(B) + [tok.eos_id]
    T = len(a) + len(b) - 1
    x, y, doc = train.Packed(tmp_path / "d", "train", T, tok).batch([0], torch.device("cpu"))
    assert x[0].tolist() == (a + b)[:T] and doc[0].tolist() == [0] * len(a) + [1] * (T - len(a))
    assert y[0, len(a) - 1] == -100                             # <|endoftext|> does not predict B's first token
    model = GPT(Config.from_name("tiny", vocab_size=2048)).eval()
    with torch.no_grad():
        packed = model(x, doc_ids=doc)[0][0]
        alone_a = model(torch.tensor([a]))[0][0]
        alone_b = model(torch.tensor([b[:T - len(a)]]))[0][0]
        unmasked = model(x)[0][0]
    torch.testing.assert_close(packed[:len(a)], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[len(a):], alone_b, atol=1e-5, rtol=1e-5)
    assert (unmasked[len(a):] - alone_b).abs().max() > 1e-3   # without document ids B does see A


def test_sft_loss_only_on_assistant_tokens(tmp_path):
    tok = Tokenizer(TOK)
    msgs = [("system", "Answer briefly."), ("user", "What is a tuple?"), ("assistant", "An immutable sequence."),
            ("user", "And a list?"), ("assistant", "A mutable one.")]
    chat = '{"messages": [%s]}' % ", ".join('{"role": "%s", "content": "%s"}' % m for m in msgs)
    text = "Plain text after the chat, trained on every token. " * 3
    (tmp_path / "sft.jsonl").write_text(f'{chat}\n{{"text": "{text}"}}\n{{"text": "held out"}}\n')
    train.prepare(inputs=[str(tmp_path / "sft.jsonl")], out=tmp_path / "d", tokenizer_dir=TOK, val_fraction=0.34)
    # the expected stream and loss positions, from ChatML text encoded piece by piece (not encode_chat)
    ids, loss_at, s = [], set(), ""
    for role, content in msgs:
        head = f"<|im_start|>{role}\n"
        start = len(tok.encode(s + head, specials=True))
        s += head + content + "<|im_end|>"
        if role == "assistant":
            loss_at |= set(range(start, len(tok.encode(s, specials=True))))
        s += "\n"
    ids = tok.encode(s, specials=True) + [tok.eos_id]
    text_ids = tok.encode(text) + [tok.eos_id]
    T = len(ids) + len(text_ids) - 1
    x, y, _ = train.Packed(tmp_path / "d", "train", T, tok).batch([0], torch.device("cpu"))
    assert x[0].tolist() == ids + text_ids[:-1]
    want = [ids[t + 1] if t + 1 in loss_at else -100 for t in range(len(ids) - 1)] + [-100]   # eos -> next doc
    want += text_ids[1:]
    assert y[0].tolist() == want


# ----------------------------------------------------------------------------- the training loop

def test_loss_falls_and_export_loads(pydoc, tmp_path):
    from convert import load_checkpoint

    run(pydoc, tmp_path, seq_len=64, micro_batch_size=4, global_batch_size=4, max_steps=40, warmup_steps=5,
        lr=1e-2, min_lr=1e-3, save_interval=40)
    loss = scalars(tmp_path)[0]
    first, last = np.mean([loss[s] for s in range(1, 6)]), np.mean([loss[s] for s in range(36, 41)])
    assert first > math.log(2048) - 0.3                        # starts near uniform over the vocabulary
    assert last < math.log(2048) - 0.8                         # ... and leaves it
    assert scalars(tmp_path, "val/loss")[0][40] < math.log(2048) - 0.6
    model, config = load_checkpoint(tmp_path / "final")
    state = torch.load(tmp_path / "step-0000040" / "state", weights_only=False)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert Tokenizer(tmp_path / "final").n_vocab == 2048 and config.n_embd == 64


def test_killed_run_resumes_with_identical_losses(pydoc, tmp_path, monkeypatch):
    run(pydoc, tmp_path / "full", global_batch_size=4, micro_batch_size=2)   # 2 micro-batches per step
    full = scalars(tmp_path / "full")[0]
    assert sorted(full) == [1, 2, 3, 4, 5, 6]

    save = train.save

    def save_then_die(fabric, state, *args):
        save(fabric, state, *args)
        if state["step"] == 3:
            raise KeyboardInterrupt   # dies right after the step-3 checkpoint is on disk
    monkeypatch.setattr(train, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(pydoc, tmp_path / "cut")
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "cut").glob("step-*")] == ["step-0000003"]
    train.main(model="tiny", model_config={"vocab_size": 2048}, tokenizer_dir=TOK, out_dir=tmp_path / "cut",
               data=train.DataArgs(path=pydoc), resume="auto", precision="32-true", accelerator="cpu",
               train=train.TrainArgs(seq_len=32, micro_batch_size=2, global_batch_size=4, max_steps=6, lr=3e-3,
                                     min_lr=3e-4, warmup_steps=2, log_interval=1, save_interval=3),
               eval=train.EvalArgs(interval=1000, max_batches=1, sample_tokens=0))
    before, after = scalars(tmp_path / "cut")
    assert sorted(before) == [1, 2, 3] and sorted(after) == [4, 5, 6]
    assert {**before, **after} == full                          # exactly, not approximately


def test_activation_checkpointing_changes_no_number(pydoc, tmp_path):
    from convert import load_checkpoint

    run(pydoc, tmp_path / "plain", max_steps=3)
    run(pydoc, tmp_path / "ckpt", max_steps=3, activation_checkpointing=True)
    assert scalars(tmp_path / "plain") == scalars(tmp_path / "ckpt")
    a, _ = load_checkpoint(tmp_path / "plain" / "final")
    b, _ = load_checkpoint(tmp_path / "ckpt" / "final")      # the export has the plain names
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_moe_aux_loss_and_spiking_metrics(tmp_path, pydoc):
    # tiny-moe has sink tokens and trains on packed rows with document ids
    run(pydoc, tmp_path, model="tiny-moe", model_config={"vocab_size": 2048, "spike_k": 3.0},
        max_steps=2, save_interval=2)
    load = scalars(tmp_path, "moe/max_load.blocks.1.mlp")[0]
    assert 1.0 <= load[2] <= 4.0                               # 1 = balanced, 4 = every token to one expert
    zeros = scalars(tmp_path, "spike/zero_fraction")[0][2]
    assert 0.0 < zeros < 1.0


def test_lr_schedule():
    lr = lambda s: train.get_lr(s, 1.0, 0.1, 10, 110)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- errors

def test_unknown_keys_are_named(tmp_path, capsys):
    from jsonargparse import CLI

    with pytest.raises(ValueError, match="n_embed"):
        train.main(model="tiny", model_config={"n_embed": 64}, dry_run=True)
    for args in (["--train.lr_max", "1"], ["--config", write(tmp_path / "c.yaml", "train:\n  lr_max: 1\n")]):
        with pytest.raises(SystemExit):
            CLI(train.main, args=args)
        assert "lr_max" in capsys.readouterr().err


def test_empty_dataset_is_an_error(tmp_path):
    files = [write(tmp_path / "empty.txt", ""), write(tmp_path / "blank.jsonl", "\n\n")]
    with pytest.raises(ValueError, match="no documents"):
        train.prepare(inputs=files, out=tmp_path / "d", tokenizer_dir=TOK)
    assert not (tmp_path / "d").exists()
    with pytest.raises(FileNotFoundError, match="train.py prepare"):
        train.Packed(tmp_path / "d", "train", 32)
    with pytest.raises(ValueError, match="seq_len"):   # data shorter than one row
        train.prepare(inputs=[write(tmp_path / "a.txt", "a b"), write(tmp_path / "b.txt", "c")], out=tmp_path / "e",
                      tokenizer_dir=TOK, val_fraction=0.5)
        train.Packed(tmp_path / "e", "train", 32)


def test_bad_jsonl_line_leaves_the_old_data_and_no_temp_dir(tmp_path):
    bad = write(tmp_path / "d.jsonl", json.dumps({"text": "fine"}) + "\nnot json\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("old")
    with pytest.raises(ValueError, match="d.jsonl:2: not JSON"):
        train.prepare(inputs=[bad], out=tmp_path / "data", tokenizer_dir=TOK)
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "data"]
    assert os.listdir(tmp_path / "data") == ["meta.json"] and (tmp_path / "data" / "meta.json").read_text() == "old"


def test_missing_tokenizer_file_is_named(tmp_path, pydoc):
    shutil.copytree(TOK, tmp_path / "tok")
    os.remove(tmp_path / "tok" / "tokenizer.tiktoken")
    with pytest.raises(FileNotFoundError, match="tokenizer.tiktoken"):
        train.prepare(inputs=["pydoc"], out=tmp_path / "d", tokenizer_dir=tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="tokenizer.tiktoken"):
        train.main(model="tiny", model_config={"vocab_size": 2048}, tokenizer_dir=tmp_path / "tok",
                   out_dir=tmp_path / "o", data=train.DataArgs(path=pydoc), accelerator="cpu")


# ----------------------------------------------------------------------------- dry run, configs, bench

def params_7b():
    """SpikingBrain-7B parameters from the SPEC's dimensions, counted by hand."""
    V, D, Q, KV, I, L = 152064, 3584, 3584, 512, 18944, 28
    layer = 2 * D + (D * Q + Q) + 2 * (D * KV + KV) + Q * D + 3 * D * I
    gla = D * 16 + 16 * KV + KV + 128                          # low-rank gate + per-head output norm
    return 2 * V * D + D + L * layer + L // 2 * gla


@pytest.mark.parametrize("world", [2, 8, 64])
def test_dry_run_plans_7b_without_allocating(world, capsys):
    train.main(model="spikingbrain-7b", train=train.TrainArgs(seq_len=8192, micro_batch_size=1,
               global_batch_size=64, max_steps=1), devices=world, dry_run=True)
    out = capsys.readouterr().out
    assert f"{params_7b() / 1e9:.3f}B parameters" in out and f"over {world} device" in out
    c = Config.from_name("spikingbrain-7b")
    ck, no = (train.estimate_memory(c, params_7b(), 1, 8192, world, "fsdp", "bf16-mixed", x) for x in (True, False))
    assert ck["weights"] == 4 * params_7b() / world and ck["optimizer"] == 8 * params_7b() / world
    assert ck["activations"] < no["activations"] / 5 and ck["logits"] == 8192 * 152064 * 6 + 152064 * 3584 * 8 + 8192 * 3584 * 2


def test_dry_run_76b(capsys):   # 76B fp32 weights would be 300 GB: this only works on the meta device
    train.main(model="spikingbrain-76b", train=train.TrainArgs(seq_len=8192, micro_batch_size=1,
               global_batch_size=64, max_steps=1), devices=8, num_nodes=8, dry_run=True)
    out = capsys.readouterr().out
    total, active = (float(out.split(s)[0].split()[-1].strip("(B")) for s in ("B parameters", "B active"))
    assert 74 < total < 78 and 11 < active < 13                # the report: ~76B total, ~12B active


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "configs" / "*.yaml"))), ids=os.path.basename)
def test_config(path):
    from jsonargparse import ArgumentParser, ActionConfigFile

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(train.main)
    cfg = parser.instantiate(parser.parse_args(["--config", path]))
    config = train.resolve_config(cfg.model, cfg.model_config, None)   # the preset; the checkpoint may not exist yet
    assert cfg.train.max_steps or cfg.train.max_tokens
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
    assert "total" in train.plan(config, cfg.train, 8, "fsdp", "bf16-mixed")
    if cfg.tokenizer_dir:
        assert Tokenizer(ROOT / cfg.tokenizer_dir).n_vocab <= config.vocab_size


def test_bench_train_runs_on_cpu(capsys):
    import bench

    bench.bench_train(preset="tiny", baseline="tiny-qwen", seq_len=64, long_seq_lens=(128,), steps=1, warmup=1,
                      precision="32-true", device="cpu")
    out = capsys.readouterr().out
    assert "| tiny | 4 | 64 |" in out and "| tiny-qwen | 4 | 64 |" in out and "tiny / tiny-qwen at 128" in out
    bench.bench_train(preset="tiny-moe", baseline="tiny-qwen", seq_len=64, long_seq_lens=(), steps=1, warmup=1,
                      precision="32-true", docs=3, device="cpu")
    assert "3 document(s) per row" in capsys.readouterr().out


# ----------------------------------------------------------------------------- FSDP, two processes

def launcher(pydoc, tmp_path, seq_len, micro, batch, *more):
    """train.py in a subprocess from one saved initial model (FSDP's sharded init draws other numbers):
    launch(out_dir, *extra_args) -> the TensorBoard losses of each run in out_dir."""
    from convert import save_checkpoint

    torch.manual_seed(0)
    config = Config.from_name("tiny", vocab_size=2048)
    save_checkpoint(GPT(config), config, tmp_path / "init", TOK)
    args = ["--model", "tiny", "--model_config", "{vocab_size: 2048}", "--init_from", str(tmp_path / "init"),
            "--data.path", str(pydoc), "--train.seq_len", str(seq_len), "--train.micro_batch_size", str(micro),
            "--train.global_batch_size", str(batch), "--train.max_steps", "4", "--train.warmup_steps", "1",
            "--train.lr", "3e-3", "--train.min_lr", "3e-4", "--train.log_interval", "1", "--train.save_interval", "2",
            "--eval.interval", "1000", "--eval.max_batches", "1", "--eval.sample_tokens", "0", *more]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def launch(out, *extra):
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--out_dir", str(out), *extra],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return scalars(out)
    return launch


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_exactly(pydoc, tmp_path):
    from convert import load_checkpoint

    launch = launcher(pydoc, tmp_path, 32, 2, 4, "--precision", "32-true", "--accelerator", "cpu", "--devices", "2",
                      "--strategy", "fsdp")
    fsdp = launch(tmp_path / "fsdp")[0]
    shards = os.listdir(tmp_path / "fsdp" / "step-0000002" / "state")
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards   # one file per rank
    # the same 4 rows per step on one process (2 micro-batches accumulated) give the same losses
    run(pydoc, tmp_path / "one", max_steps=4, warmup_steps=1, save_interval=2, init_from=tmp_path / "init")
    one = scalars(tmp_path / "one")[0]
    assert np.allclose([fsdp[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=1e-5, atol=1e-5)
    # stop after step 2 (the sharded checkpoint alone), resume on two processes: steps 3-4 repeat exactly
    shutil.copytree(tmp_path / "fsdp" / "step-0000002", tmp_path / "cut" / "step-0000002")
    resumed = launch(tmp_path / "cut", "--resume", "auto")[0]
    assert resumed == {3: fsdp[3], 4: fsdp[4]}
    model, _ = load_checkpoint(tmp_path / "cut" / "final")     # the export gathers the shards into one file
    assert sum(p.numel() for p in model.parameters()) == GPT(Config.from_name("tiny", vocab_size=2048)).num_params()


@pytest.mark.slow
def test_fsdp_moe_with_idle_experts(pydoc, tmp_path):
    # 8 tokens per rank over 8 experts: some expert gets no token on some rank
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "tiny-moe", "--model_config",
                        "{vocab_size: 2048, n_expert: 8}", "--tokenizer_dir", str(TOK), "--data.path", str(pydoc),
                        "--data.doc_mask", "false", "--train.seq_len", "8", "--train.micro_batch_size", "1",
                        "--train.global_batch_size", "2", "--train.max_steps", "2", "--train.log_interval", "1",
                        "--eval.max_batches", "1", "--eval.sample_tokens", "0", "--precision", "32-true",
                        "--accelerator", "cpu", "--devices", "2", "--strategy", "fsdp",
                        "--out_dir", str(tmp_path / "moe")],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert scalars(tmp_path / "moe", "moe/max_load.blocks.1.mlp")[0]


def test_validate_equals_perplexity_of_all_target_tokens(pydoc):
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny", vocab_size=2048)).eval()
    data = train.Packed(pydoc, "val", 32, Tokenizer(TOK))
    fabric = SimpleNamespace(world_size=1, global_rank=0, device=torch.device("cpu"))
    loss, ppl = train.validate(fabric, model, data, micro_batch_size=2, max_batches=3)
    x, y, doc = data.batch(list(range(6)), torch.device("cpu"))
    logits = model(x, doc_ids=doc)[0].double()
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    assert loss == pytest.approx(ref.item(), rel=1e-5) and ppl == pytest.approx(math.exp(ref.item()), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fsdp_matches_single_device_and_resumes(pydoc, tmp_path):
    """FSDP2 on one CUDA device in bf16-mixed: the losses follow the unsharded run, and a run resumed from the
    sharded step-2 checkpoint repeats steps 3-4."""
    launch = launcher(pydoc, tmp_path, 256, 4, 8, "--precision", "bf16-mixed", "--accelerator", "cuda",
                      "--devices", "1")
    fsdp = launch(tmp_path / "fsdp", "--strategy", "fsdp")[0]
    single = launch(tmp_path / "single", "--strategy", "single")[0]
    assert sorted(fsdp) == [1, 2, 3, 4]
    assert np.allclose([fsdp[s] for s in fsdp], [single[s] for s in fsdp], rtol=2e-2)
    shutil.copytree(tmp_path / "fsdp" / "step-0000002", tmp_path / "cut" / "step-0000002")
    resumed = launch(tmp_path / "cut", "--strategy", "fsdp", "--resume", "auto")[0]
    assert sorted(resumed) == [3, 4]
    assert np.allclose([resumed[s] for s in (3, 4)], [fsdp[s] for s in (3, 4)], rtol=1e-3)

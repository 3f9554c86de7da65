"""train.py with data.py and the demo tokenizer, on CPU: data preparation and packing, SFT loss masks, the training loop
(the loss falls, a resumed run repeats an uninterrupted one exactly), clear errors, FSDP over two processes, the
dry-run plan, every config."""
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
import data
from data import Packed, prepare, train_rows
import convert
import kernels
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


def run(data_dir, out_dir, model="tiny", model_config=None, data=None, init_from=None, resume=False, overwrite=False,
        **train_kw):
    args = dict(seq_len=32, micro_batch_size=2, global_batch_size=4, max_steps=6, lr=3e-3, min_lr=3e-4,
                warmup_steps=2, log_interval=1, save_interval=3)
    train.main(model=model, model_config=model_config or {"vocab_size": 2048}, tokenizer_dir=TOK, out_dir=out_dir,
               data=data or train.DataArgs(path=data_dir), train=train.TrainArgs(**{**args, **train_kw}),
               eval=train.EvalArgs(interval=1000, max_batches=1, sample_tokens=0), precision="32-true",
               accelerator="cpu", init_from=init_from, resume=resume, overwrite=overwrite)


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "pydoc"
    prepare(inputs=["pydoc"], out=out, tokenizer_dir=TOK, val_fraction=0.1)
    return out


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- tokenizer and data

def test_shipped_tokenizer_is_rebuilt_by_its_command(tmp_path):
    data.build_tokenizer(out=tmp_path / "tok")
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
        prepare(inputs=files, out=out, tokenizer_dir=TOK, val_fraction=0.5, shard_tokens=shard_tokens)
        for split, idx in (("train", [0, 2]), ("val", [1, 3])):   # every 2nd document validates
            shards = sorted(out.glob(f"{split}-*.bin"))
            tokens = np.concatenate([np.fromfile(s, np.uint32) for s in shards])
            assert tokens.tolist() == sum((want[i] for i in idx), [])
            starts = [np.fromfile(s.with_suffix(".idx"), np.int64).tolist() for s in shards]
            assert sum(len(s) - 1 for s in starts) == 2 and all(s[0] == 0 for s in starts)
        assert len(list(out.glob("train-*.bin"))) == (1 if name == "one" else 2)
        assert not list(out.glob("*.mask"))                   # no chat data, no masks
    again = tmp_path / "again"
    prepare(inputs=files, out=again, tokenizer_dir=TOK, val_fraction=0.5)
    for f in (tmp_path / "one").iterdir():                     # deterministic to the byte
        assert (again / f.name).read_bytes() == f.read_bytes()


def test_packed_rows_and_epoch_order(pydoc):
    data = Packed(pydoc, "train", 64, Tokenizer(TOK))
    tokens = np.fromfile(pydoc / "train-00000.bin", np.uint32)
    x, y, doc = data.row(3)
    assert x.tolist() == tokens[3 * 64:4 * 64].tolist()
    keep = y != -100
    assert (y[keep] == tokens[3 * 64 + 1:4 * 64 + 1][keep]).all()
    n = len(data)
    epoch = [r for it in range(n // 4) for rank in range(2) for r in train_rows(n, it, rank, 2, 2, seed=5)]
    assert len(set(epoch)) == len(epoch) == n // 4 * 4         # within an epoch no row repeats, across ranks too
    assert train_rows(n, 7, 1, 2, 2, seed=5) == train_rows(n, 7, 1, 2, 2, seed=5)
    assert train_rows(n, 7, 1, 2, 2, seed=5) != train_rows(n, 7, 1, 2, 2, seed=6)


def test_packing_a_token_never_sees_the_previous_document(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer(TOK)
    A = "Short first document about lists."
    B = ("The second document is longer, so that the sliding window of the tiny preset (16 tokens) matters: "
         "while loops, for loops, generators and comprehensions all iterate.")
    files = [write(tmp_path / f"{i}.txt", t) for i, t in enumerate([A, B, "validation text"])]
    prepare(inputs=files, out=tmp_path / "d", tokenizer_dir=TOK, val_fraction=0.34)
    a, b = tok.encode(A) + [tok.eos_id], tok.encode(B) + [tok.eos_id]
    T = len(a) + len(b) - 1
    x, y, doc = Packed(tmp_path / "d", "train", T, tok).batch([0], torch.device("cpu"))
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
    prepare(inputs=[str(tmp_path / "sft.jsonl")], out=tmp_path / "d", tokenizer_dir=TOK, val_fraction=0.34)
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
    x, y, _ = Packed(tmp_path / "d", "train", T, tok).batch([0], torch.device("cpu"))
    assert x[0].tolist() == ids + text_ids[:-1]
    want = [ids[t + 1] if t + 1 in loss_at else -100 for t in range(len(ids) - 1)] + [-100]   # eos -> next doc
    want += text_ids[1:]
    assert y[0].tolist() == want


def train_py(cwd, *commands):
    """`python train.py ARGS` for each ARGS, all at once (each process imports torch: seconds); results in order."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in commands]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_prepare_command_takes_paths_as_a_shell_gives_them(tmp_path):
    docs = [f"Document {i}: some words to tokenize. " * (i + 1) for i in range(6)]
    write(tmp_path / "a.txt", docs[0])
    write(tmp_path / "b.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs[1:3]))
    (tmp_path / "corpus" / "d").mkdir(parents=True)   # a directory's files are taken sorted by path, recursively
    for name, d in (("c.txt", docs[3]), ("d/e.md", docs[4]), ("f.txt", docs[5])):
        write(tmp_path / "corpus" / name, d)
    cases = {"one": (["b.jsonl"], [1, 2]), "several": (["a.txt", "b.jsonl", "corpus/"], [0, 1, 2, 3, 4, 5]),
             "dir": (["corpus"], [3, 4, 5])}
    results = train_py(tmp_path, *(["prepare", "--inputs", *paths, "--out", out, "--tokenizer_dir", str(TOK),
                                    "--val_fraction", "0.5"] for out, (paths, _) in cases.items()))
    tok = Tokenizer(TOK)
    for (out, (paths, which)), p in zip(cases.items(), results):
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads((tmp_path / out / "meta.json").read_text())["inputs"] == paths
        for split, idx in (("train", which[0::2]), ("val", which[1::2])):   # every 2nd document validates
            tokens = np.concatenate([np.fromfile(s, np.uint32) for s in sorted((tmp_path / out).glob(f"{split}-*.bin"))])
            assert tokens.tolist() == sum((tok.encode(docs[i]) + [tok.eos_id] for i in idx), []), (out, split)
    # the other spellings: after "=", and a list already written as one value
    assert train.cli_args(["--inputs=a b.txt", "--out", "o"]) == ["--inputs", '["a b.txt"]', "--out", "o"]
    assert train.cli_args(["--inputs", "[a.txt, b.txt]"]) == ["--inputs", "[a.txt, b.txt]"]


def test_prepared_data_gets_the_users_umask(tmp_path):
    import stat

    files = [write(tmp_path / f"{i}.txt", f"document {i}") for i in range(2)]
    old = os.umask(0o027)   # neither the usual 022 nor the 0700 of a temp directory
    try:
        prepare(inputs=files, out=tmp_path / "d", tokenizer_dir=TOK, val_fraction=0.5)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "d").iterdir()} == {0o640}


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


@pytest.mark.parametrize("ac", [True, 1])   # every block; only the first (the rest keep their activations)
def test_activation_checkpointing_changes_no_number(pydoc, tmp_path, ac):
    from convert import load_checkpoint

    run(pydoc, tmp_path / "plain", max_steps=3)
    run(pydoc, tmp_path / "ckpt", max_steps=3, activation_checkpointing=ac)
    assert scalars(tmp_path / "plain") == scalars(tmp_path / "ckpt")
    a, _ = load_checkpoint(tmp_path / "plain" / "final")
    b, _ = load_checkpoint(tmp_path / "ckpt" / "final")      # the export has the plain names
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_checkpoint_blocks_wraps_the_first_n():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    m = GPT(Config.from_name("tiny"))
    kernels.checkpoint_blocks(m, 3)
    assert [isinstance(b, CheckpointWrapper) for b in m.blocks] == [True, True, True, False]


def test_activation_checkpointing_auto_takes_the_fewest_blocks_that_fit(monkeypatch):
    L = 28
    plan = lambda n: {"total": 100e9 - 2e9 * n}               # each checkpointed block saves 2 GB
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [train.checkpointed_blocks(ac, L, plan, cpu) for ac in (True, False, 0, 5, "auto")] == [L, 0, 0, 5, L]
    memory = {}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), memory)())
    memory["total_memory"] = 80e9 / train.AUTO_MEMORY_SHARE      # 80 GB to fill: 10 blocks
    assert train.checkpointed_blocks("auto", L, plan, gpu) == 10
    memory["total_memory"] = 81e9 / train.AUTO_MEMORY_SHARE      # 81 GB: still 10 (9 would plan 82)
    assert train.checkpointed_blocks("auto", L, plan, gpu) == 10
    memory["total_memory"] = 200e9                               # everything fits: none
    assert train.checkpointed_blocks("auto", L, plan, gpu) == 0
    memory["total_memory"] = 10e9                                # nothing fits: every block, the least memory
    assert train.checkpointed_blocks("auto", L, plan, gpu) == L


def test_memory_plan_of_some_checkpointed_blocks():
    """n checkpointed blocks of L equal ones: the other L - n keep their activations (a each per token), the n keep
    their input (2 * n_embd bytes per token), and one at a time recomputes its activations in the backward pass."""
    c = Config.from_name("tiny-qwen")
    T, L, D = 512, c.n_layer, c.n_embd
    a = train.activation_bytes(c, T)[0]
    assert train.activation_bytes(c, T) == [a] * L
    plans = [train.estimate_memory(c, 10 ** 6, 2, T, 1, "single", "bf16-mixed", n) for n in range(L + 1)]
    for n, m in enumerate(plans):
        assert m["activations"] == 2 * T * ((L - n) * a + 2 * D * n + (a if n else 0)), n
    assert plans[0] == train.estimate_memory(c, 10 ** 6, 2, T, 1, "single", "bf16-mixed", False)
    assert plans[L] == train.estimate_memory(c, 10 ** 6, 2, T, 1, "single", "bf16-mixed", True)
    with pytest.raises(ValueError, match=r"train.activation_checkpointing=5: a number of blocks must lie in 0..4"):
        train.main(model="tiny", train=train.TrainArgs(max_steps=1, activation_checkpointing=5), dry_run=True)


def test_moe_aux_loss_and_spiking_metrics(tmp_path, pydoc):
    # tiny-moe has sink tokens and trains on packed rows with document ids
    run(pydoc, tmp_path, model="tiny-moe", model_config={"vocab_size": 2048, "spike_k": 3.0},
        max_steps=2, save_interval=2)
    load = scalars(tmp_path, "moe/max_load.blocks.1.mlp")[0]
    assert 1.0 <= load[2] <= 4.0                               # 1 = balanced, 4 = every token to one expert
    zeros = scalars(tmp_path, "spike/zero_fraction")[0][2]
    assert 0.0 < zeros < 1.0


def test_flops_per_token_hand_count():
    c = Config.from_name("tiny")
    m = GPT(c)
    T = 100
    n = m.num_params(embeddings=False) + m.lm_head.weight.numel()
    mix = 2 * 12 * 4 * 16 * 16 + 2 * 12 * 4 * 16 * (c.window + 1)   # 2 gla + 2 swa layers
    assert m.flops_per_token(T) == 6 * n + mix


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
        prepare(inputs=files, out=tmp_path / "d", tokenizer_dir=TOK)
    assert not (tmp_path / "d").exists()
    with pytest.raises(FileNotFoundError, match="train.py prepare"):
        Packed(tmp_path / "d", "train", 32)
    with pytest.raises(ValueError, match="seq_len"):   # data shorter than one row
        prepare(inputs=[write(tmp_path / "a.txt", "a b"), write(tmp_path / "b.txt", "c")], out=tmp_path / "e",
                tokenizer_dir=TOK, val_fraction=0.5)
        Packed(tmp_path / "e", "train", 32)


def test_bad_jsonl_line_leaves_the_old_data_and_no_temp_dir(tmp_path):
    bad = write(tmp_path / "d.jsonl", json.dumps({"text": "fine"}) + "\nnot json\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("old")
    with pytest.raises(ValueError, match="d.jsonl:2: not JSON"):
        prepare(inputs=[bad], out=tmp_path / "data", tokenizer_dir=TOK)
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "data"]
    assert os.listdir(tmp_path / "data") == ["meta.json"] and (tmp_path / "data" / "meta.json").read_text() == "old"


def test_missing_tokenizer_file_is_named(tmp_path, pydoc):
    shutil.copytree(TOK, tmp_path / "tok")
    os.remove(tmp_path / "tok" / "tokenizer.tiktoken")
    with pytest.raises(FileNotFoundError, match="tokenizer.tiktoken"):
        prepare(inputs=["pydoc"], out=tmp_path / "d", tokenizer_dir=tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="tokenizer.tiktoken"):
        train.main(model="tiny", model_config={"vocab_size": 2048}, tokenizer_dir=tmp_path / "tok",
                   out_dir=tmp_path / "o", data=train.DataArgs(path=pydoc), accelerator="cpu")


def test_config_values_take_their_field_types(tmp_path):
    import yaml

    c = Config.from_name("tiny", spike_k="3", n_embd="128", norm_eps=1, moe_layers="[1, 3]")
    assert (c.spike_k, c.n_embd, c.norm_eps, c.moe_layers) == (3.0, 128, 1.0, [1, 3])
    assert type(c.spike_k) is float and type(c.n_embd) is int and type(c.norm_eps) is float
    assert Config.from_name("tiny", spike_k="null").spike_k is None and Config.from_name("tiny", spike_k="None").spike_k is None
    for key, value, want in (("n_embd", "abc", "int"), ("n_embd", 64.5, "int"), ("spike_k", "three", "float or null"),
                             ("layout", "gla", "list")):
        with pytest.raises(ValueError, match=f"{key}={value!r} must be {want}"):
            Config.from_name("tiny", **{key: value})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**Config.from_name("tiny").to_dict(), "n_embd": "abc"}))
    with pytest.raises(ValueError, match="n_embd='abc' must be int"):   # a checkpoint's config
        convert.load_config(tmp_path / "config.yaml")


def test_batch_sizes_are_checked_and_the_micro_batch_fits_the_devices(capsys):
    def plan(devices, micro, batch):
        train.main(model="tiny", train=train.TrainArgs(micro_batch_size=micro, global_batch_size=batch),
                   devices=devices, dry_run=True)
        return capsys.readouterr().out
    out = plan(2, 8, 8)                                        # configs/tiny.yaml on 2 processes: 4 rows per device
    assert "train.micro_batch_size 8 -> 4" in out and "micro batch 4 x" in out
    assert "micro batch 3 x" in plan(2, 4, 12)                 # 6 rows per device: 4 does not divide them, 3 does
    assert "micro batch 1 x" in plan(1, 4, 7)                  # 7 rows: only 1 divides them
    out = plan(2, 4, 16)
    assert "micro batch 4 x" in out and "micro_batch_size 4 ->" not in out   # it fits: unchanged, nothing said
    with pytest.raises(ValueError, match="global_batch_size=9 must be a multiple of the 2 devices"):
        plan(2, 1, 9)
    for k in ("seq_len", "micro_batch_size", "global_batch_size"):
        with pytest.raises(ValueError, match=f"train.{k}=0 must be >= 1"):
            train.main(model="tiny", train=train.TrainArgs(**{k: 0}), dry_run=True)


def test_input_errors_name_the_file(tmp_path):
    import re

    (tmp_path / "img.bin").write_bytes(bytes(range(256)))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    write(tmp_path / "nul.txt", "text\0more")
    write(tmp_path / "docs.json", json.dumps([{"text": "a"}, {"text": "b"}], indent=1))   # not one object a line
    ok = write(tmp_path / "ok.txt", "fine text")
    for name, message in (("img.bin", "img.bin: not UTF-8 text"), ("latin1.jsonl", "latin1.jsonl:2: not UTF-8 text"),
                          ("nul.txt", "nul.txt: holds NUL bytes"), ("docs.json", "docs.json:1: not JSON")):
        with pytest.raises(ValueError, match=re.escape(message)):
            prepare(inputs=[ok, str(tmp_path / name)], out=tmp_path / "d", tokenizer_dir=TOK)
    assert not (tmp_path / "d").exists()
    write(tmp_path / "file", "")
    unwritable = [tmp_path / "file" / "out"]                   # below a file: no user can write there
    if os.geteuid() != 0:                                      # root writes into a read-only directory anyway
        (tmp_path / "ro").mkdir(mode=0o500)
        unwritable.append(tmp_path / "ro")
    for out_dir in unwritable:
        with pytest.raises(PermissionError, match=f"out_dir {re.escape(str(out_dir))} is not writable"):
            train.main(model="tiny", model_config={"vocab_size": 2048}, out_dir=out_dir, accelerator="cpu")


def test_command_line_merges_typed_model_config_lists_every_option_and_reports_user_errors(tmp_path):
    import re

    import yaml

    tiny = ROOT / "configs" / "tiny.yaml"
    (tmp_path / "bad.yaml").write_text("model: tiny\nmodel_config:\n  n_embd: abc\n")
    merged, bad, help_ = train_py(
        tmp_path, ["--config", str(tiny), "--model_config", "{window: 32}", "--model_config.spike_k", "3",
                   "--print_config"],
        ["--config", "bad.yaml", "--dry_run", "true"], ["--help"])
    assert merged.returncode == 0, merged.stderr[-2000:]
    cfg = yaml.safe_load(merged.stdout)
    config = train.resolve_config(cfg["model"], cfg["model_config"], None)
    for k, v in {**yaml.safe_load(tiny.read_text())["model_config"], "window": 32, "spike_k": 3.0}.items():
        assert getattr(config, k) == v and type(getattr(config, k)) is type(v), k   # tiny.yaml's, plus the two
    # a user error: one line, exit status 2, no traceback
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == "error: config key n_embd='abc' must be int: fix it in model_config " \
                                                  "or the config.yaml"
    assert help_.returncode == 0
    options = [e for e in re.split(r"\n  (?=--)", help_.stdout) if "(type:" in e]   # main's, data.*, train.*, eval.*
    assert len(options) == len(train.DataArgs.__dataclass_fields__) + len(train.TrainArgs.__dataclass_fields__) + \
        len(train.EvalArgs.__dataclass_fields__) + sum(k not in ("data", "train", "eval")
                                                       for k in train.main.__kwdefaults__)
    for e in options:   # every one says what it does, not only its type
        head, _, rest = e.partition("\n")
        text = (re.split(r" {2,}", head.strip(), maxsplit=1) + [""])[1] + " " + rest
        assert text.split("(type:")[0].strip(), e
    assert re.search(r"train\.py prepare --inputs", help_.stdout) and "train.py tokenizer" in help_.stdout


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
    assert "activation_checkpointing auto checkpoints: " in out and " on an H200 (141 GB)" in out
    c = Config.from_name("spikingbrain-7b")
    ck, no = (train.estimate_memory(c, params_7b(), 1, 8192, world, "fsdp", "bf16-mixed", x) for x in (True, False))
    assert ck["weights"] == 4 * params_7b() / world and ck["optimizer"] == 8 * params_7b() / world
    assert ck["grads"] == 4 * params_7b() / world   # fp32 shards, however many micro-batches a step (fit)
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

def launcher(pydoc, tmp_path, seq_len, micro, batch, *more, model="tiny", **overrides):
    """train.py in a subprocess from one saved initial model (FSDP's sharded init draws other numbers) of preset
    `model` with vocab_size 2048 and `overrides`: launch(out_dir, *extra_args) -> the TensorBoard losses of each run
    in out_dir."""
    from convert import save_checkpoint

    torch.manual_seed(0)
    config = Config.from_name(model, vocab_size=2048, **overrides)
    save_checkpoint(GPT(config), config, tmp_path / "init", TOK)
    args = ["--model", model, "--model_config", json.dumps({"vocab_size": 2048, **overrides}),
            "--init_from", str(tmp_path / "init"),
            "--data.path", str(pydoc), "--train.seq_len", str(seq_len), "--train.micro_batch_size", str(micro),
            "--train.global_batch_size", str(batch), "--train.max_steps", "4", "--train.warmup_steps", "1",
            "--train.lr", "3e-3", "--train.min_lr", "3e-4", "--train.log_interval", "1", "--train.save_interval", "2",
            "--eval.interval", "1000", "--eval.max_batches", "1", "--eval.sample_tokens", "0", *more]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def launch(out, *extra):
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--out_dir", str(out), *extra],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return scalars(out)
    return launch


def train_two_steps_in_process(pydoc, tmp_path, strategy, **train_kw):
    """train.main in this process on one CPU device: 2 steps of 2 micro-batches (tiny, 32 tokens a row)."""
    env = dict(os.environ)
    try:   # FSDP's one-device process group and the MASTER_PORT it sets must not outlive the test
        train.main(model="tiny", model_config={"vocab_size": 2048}, tokenizer_dir=TOK, out_dir=tmp_path / "out",
                   data=train.DataArgs(path=pydoc), precision="32-true", accelerator="cpu", devices=1,
                   strategy=strategy, eval=train.EvalArgs(interval=1000, max_batches=1, sample_tokens=0),
                   train=train.TrainArgs(seq_len=32, micro_batch_size=1, global_batch_size=2, max_steps=2,
                                         save_interval=0, **train_kw))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


@pytest.mark.parametrize("strategy", ["fsdp", "single"])
def test_fsdp_reduces_every_micro_batch(pydoc, tmp_path, monkeypatch, strategy):
    """Between the micro-batches of a step FSDP2 reduce-scatters (its fp32 gradient shards accumulate); skipped, it
    would hold each device's whole gradient unsharded, 4 bytes a parameter on every device. Without sharding the
    sync is skipped until a step's last micro-batch."""
    import lightning
    asked, original = [], lightning.fabric.Fabric.no_backward_sync

    def spy(self, module, enabled=True):
        asked.append(enabled)
        return original(self, module, enabled)

    monkeypatch.setattr(lightning.fabric.Fabric, "no_backward_sync", spy)
    train_two_steps_in_process(pydoc, tmp_path, strategy)
    assert asked == ([False] * 4 if strategy == "fsdp" else [True, False] * 2)


def test_fsdp_gathers_the_next_block_while_one_runs(pydoc, tmp_path, monkeypatch):
    """FSDP2 prefetches explicitly: block i + 1's all-gather is issued as block i starts its forward, block i - 1's as
    block i starts its backward, so the gathers overlap compute even where host syncs keep the CPU from running
    ahead. Counted here: every prefetch FSDP2 issues, by pass and target block, over 2 steps of 2 micro-batches."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    seen, original = [], FSDPParamGroup._prefetch_unshard

    def spy(group, pass_type):
        seen.append((pass_type, group._module_fqn.split("blocks.")[-1]))
        return original(group, pass_type)

    monkeypatch.setattr(FSDPParamGroup, "_prefetch_unshard", staticmethod(spy))
    train_two_steps_in_process(pydoc, tmp_path, "fsdp")
    micro_batch = [("forward", b) for b in "123"] + [("backward", b) for b in "3210"]   # 4 blocks; 3 from the head
    assert seen[:4 * 7] == micro_batch * 4, seen
    assert seen[4 * 7:] == micro_batch[:3], seen   # the validation forward


def test_fsdp_without_reshard_after_forward_gathers_each_block_once(pydoc, tmp_path, monkeypatch):
    """reshard_after_forward=False: a block's weights stay gathered from its forward to its backward, so the blocks
    are all-gathered once per micro-batch instead of twice (the last block already was); the losses are the same."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    gathers, original = [], FSDPParamGroup.unshard

    def spy(group, async_op=False):   # an unshard that gathers (one device: the same call, no communication)
        if group._all_gather_result is None and not group.is_unsharded:
            gathers.append(group._module_fqn)
        return original(group, async_op)

    monkeypatch.setattr(FSDPParamGroup, "unshard", spy)
    runs = {}
    for reshard in (True, False):
        gathers.clear()
        train_two_steps_in_process(pydoc, tmp_path / str(reshard), "fsdp", reshard_after_forward=reshard)
        runs[reshard] = len(gathers), scalars(tmp_path / str(reshard) / "out")
    (n_yes, loss_yes), (n_no, loss_no) = runs[True], runs[False]
    assert n_yes - n_no == 4 * 3 and loss_yes == loss_no   # 4 micro-batches x the 3 blocks resharded before


def test_compiled_blocks_stay_under_the_recompile_limit(tmp_path, monkeypatch, dynamo_config):
    """Compiled blocks of the 76B's four kinds (la+swa or la+fa, dense or MoE FFN; sinks), half of them checkpointed
    (under FSDP2 those keep the Block class, the rest become FSDPBlock), trained on rows of one document and of
    several, and validated without gradients: every variant compiles, none falls back to eager past dynamo's limit
    (which fails the run here)."""
    import functools
    import random

    rng = random.Random(0)
    words = "list tuple dict set loop yield class import return lambda".split()
    docs = [" ".join(rng.choices(words, k=rng.choice([3, 80]))) for _ in range(60)]
    prepare(inputs=[write(tmp_path / f"{i}.txt", d) for i, d in enumerate(docs)], out=tmp_path / "d", tokenizer_dir=TOK,
            val_fraction=0.25)
    seen, batch = set(), Packed.batch

    def spy(self, rows, device):   # (grad mode, packed documents) of every batch: each variant must occur
        x, y, doc = batch(self, rows, device)
        seen.add((torch.is_grad_enabled(), bool((doc[:, 1:] != doc[:, :-1]).any())))
        return x, y, doc

    monkeypatch.setattr(Packed, "batch", spy)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))   # capture, no codegen
    dynamo_config(recompile_limit=8, fail_on_recompile_limit_hit=True)   # compile_blocks raises it; restored after
    torch._dynamo.reset()   # the code objects' caches outlive other tests' models
    env = dict(os.environ)
    try:
        train.main(model="tiny-moe", model_config={"vocab_size": 2048, "n_layer": 8, "layout": ["la+swa", "la+fa"] * 4,
                                                   "moe_layers": [2, 3, 6, 7]},
                   tokenizer_dir=TOK, out_dir=tmp_path / "out", data=train.DataArgs(path=tmp_path / "d"),
                   precision="32-true", accelerator="cpu", devices=1, strategy="fsdp",
                   eval=train.EvalArgs(interval=1, max_batches=2, sample_tokens=0),
                   train=train.TrainArgs(seq_len=32, micro_batch_size=2, global_batch_size=2, max_steps=3,
                                         save_interval=0, compile=True, activation_checkpointing=4))
    finally:
        torch._dynamo.reset()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
    assert seen == {(True, False), (True, True), (False, False), (False, True)}


def test_compiled_blocks_take_rows_of_any_document_count(monkeypatch, dynamo_config):
    """Packed rows of 2 ... 20 documents through compiled blocks (the tiny MoE, sinks; on CPU the GLA reference
    loops over the documents): one graph serves every count, so the limit is never reached."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    dynamo_config(recompile_limit=8, fail_on_recompile_limit_hit=True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-moe", vocab_size=2048)).eval()
    kernels.compile_blocks(model)
    x = torch.randint(0, 2048, (1, 60))
    try:
        with torch.no_grad():
            for n in range(2, 21):   # n documents: n - 1 random cuts
                cuts = torch.randperm(59)[:n - 1] + 1
                model(x, x, torch.zeros(1, 60, dtype=torch.long).index_fill(1, cuts, 1).cumsum(1))
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_exactly(pydoc, tmp_path):
    from convert import load_checkpoint

    # 2 micro-batches of one row per device a step: their fp32 gradient shards accumulate between the reduce-scatters
    launch = launcher(pydoc, tmp_path, 32, 1, 4, "--precision", "32-true", "--accelerator", "cpu", "--devices", "2",
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
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
                           "PYTHONPATH", "")])}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert scalars(tmp_path / "moe", "moe/max_load.blocks.1.mlp")[0]


@pytest.mark.slow
def test_context_parallel_matches_one_process(pydoc, tmp_path):
    # each row split over 2 processes: DDP with 1 data-parallel rank, and FSDP2 over 4 processes = 2 data-parallel x
    # 2 context-parallel. The gradient norm checks the gradient's scale, which AdamW and clipping would hide
    launch = launcher(pydoc, tmp_path, 32, 2, 4, "--precision", "32-true", "--accelerator", "cpu",
                      "--data.doc_mask", "false", "--context_parallel", "2")
    run(pydoc, tmp_path / "one", max_steps=4, warmup_steps=1, save_interval=2, init_from=tmp_path / "init",
        data=train.DataArgs(path=pydoc, doc_mask=False))
    for name, extra in (("ddp", ("--devices", "2", "--strategy", "ddp")), ("fsdp", ("--devices", "4"))):
        launch(tmp_path / name, *extra)
        for tag in ("train/loss", "train/grad_norm"):
            got, want = scalars(tmp_path / name, tag)[0], scalars(tmp_path / "one", tag)[0]
            assert np.allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)], rtol=1e-5), (name, tag)
    val, want = scalars(tmp_path / "ddp", "val/loss")[0], scalars(tmp_path / "one", "val/loss")[0]
    assert np.isclose(val[4], want[4], rtol=1e-5)   # the same validation rows, each split over the 2 processes


@pytest.mark.slow
def test_context_parallel_packed_documents_sinks_full_attention(tmp_path):
    # short documents: rows of 32 tokens hold several, some crossing the split at 16. tiny-moe: 4 sinks, la+fa and
    # la+swa layers, MoE with its balance loss (the row's on every rank: kernels.cp_balance)
    texts = [" ".join(["word"] * (3 + i % 9) + [f"document {i}."]) for i in range(160)]
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare(inputs=[str(tmp_path / "short.jsonl")], out=tmp_path / "data", tokenizer_dir=TOK, val_fraction=0.1)
    _, _, doc = Packed(tmp_path / "data", "train", 32, Tokenizer(TOK)).batch(range(8), torch.device("cpu"))
    assert (doc[:, 15] == doc[:, 16]).any() and (doc[:, 15] != doc[:, 16]).any() and (doc[:, -1] > 0).all()
    over = {"aux_loss_coef": 0.5}
    launch = launcher(tmp_path / "data", tmp_path, 32, 2, 4, "--precision", "32-true", "--accelerator", "cpu",
                      "--context_parallel", "2", "--devices", "2", "--strategy", "ddp", model="tiny-moe", **over)
    launch(tmp_path / "cp")
    run(tmp_path / "data", tmp_path / "one", model="tiny-moe", model_config={"vocab_size": 2048, **over}, max_steps=4,
        warmup_steps=1, save_interval=2, init_from=tmp_path / "init")
    for tag in ("train/loss", "train/grad_norm", "val/loss"):
        got, want = scalars(tmp_path / "cp", tag)[0], scalars(tmp_path / "one", tag)[0]
        assert sorted(got) == sorted(want) and np.allclose([got[s] for s in want], [want[s] for s in want],
                                                           rtol=1e-5), (tag, got, want)


def test_context_parallel_refuses_what_it_cannot_split():
    def plan(model="tiny", devices=2, cp=2, doc_mask=False, **kw):
        train.main(model=model, data=train.DataArgs(doc_mask=doc_mask), train=train.TrainArgs(**kw), devices=devices,
                   context_parallel=cp, dry_run=True)
    for kw, match in (({"devices": 3}, "must divide the 3 devices"), ({"seq_len": 1}, "shorter than"),
                      ({"compile": True}, "--train.compile false")):
        with pytest.raises(ValueError, match=match):
            plan(**kw)
    plan(model="tiny-moe", doc_mask=True)   # sinks, full attention and packed documents split too
    c = Config.from_name("spikingbrain-7b")   # the 128k stage: a device holds 1/8 of each row's activations
    one, split = (train.estimate_memory(c, params_7b(), 1, 131072, 64, "fsdp", "bf16-mixed", True, cp) for cp in (1, 8))
    assert split["activations"] == one["activations"] / 8 and split["weights"] == one["weights"]
    c = Config.from_name("spikingbrain-7b", layout=["gla", "fa"] * 14)   # with checkpointing one fa layer at a time
    one, split = (train.estimate_memory(c, params_7b(), 1, 131072, 64, "fsdp", "bf16-mixed", True, cp) for cp in (1, 8))
    assert split["activations"] - one["activations"] / 8 == 7 * 16384 * 2 * c.n_kv_head * c.head_dim * 2   # K, V bf16


def test_validate_equals_perplexity_of_all_target_tokens(pydoc):
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny", vocab_size=2048)).eval()
    data = Packed(pydoc, "val", 32, Tokenizer(TOK))
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


# ----------------------------------------------------------------------------- out_dir safety

def test_fresh_run_into_another_runs_out_dir_is_refused_or_overwritten(pydoc, tmp_path):
    from convert import load_checkpoint

    run(pydoc, tmp_path)                                        # the old run: step-3, step-6, final
    old_final = (tmp_path / "final" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=rf"{tmp_path} .*step-0000006, final.*resume=auto.*overwrite=true"):
        run(pydoc, tmp_path, max_steps=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000003", "step-0000006"]
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == old_final
    # overwrite: the old run goes; keep_last prunes the new run's own checkpoints, not the old higher steps' way
    run(pydoc, tmp_path, max_steps=2, save_interval=1, keep_last=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000002"]
    assert [sorted(s) for s in scalars(tmp_path)] == [[1, 2]]   # the old run's curves are gone too
    model, _ = load_checkpoint(tmp_path / "final")
    state = torch.load(tmp_path / "step-0000002" / "state", weights_only=True)["model"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="at step 2, beyond train.max_steps=1"):
        run(pydoc, tmp_path, max_steps=1, resume="auto")
    run(pydoc, tmp_path, max_steps=2, resume="auto")           # at max_steps: nothing to train, exported again
    assert torch.equal(load_checkpoint(tmp_path / "final")[0].lm_head.weight, model.lm_head.weight)
    for p in tmp_path.glob("step-*"):                          # a finished run whose checkpoints were deleted
        shutil.rmtree(p)
    with pytest.raises(FileExistsError, match=r"holds a finished run \(final/\) and no step-\* checkpoint"):
        run(pydoc, tmp_path, max_steps=2, resume="auto")
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_kills_while_pruning_or_exporting_leave_no_half_checkpoint(pydoc, tmp_path, monkeypatch):
    rmtree = shutil.rmtree

    def die_midway(path, *args, **kw):   # the kill lands inside the deletion of step-3 (keep_last=1, at step 6)
        if "step-0000003" in str(path) and ".tmp-" not in str(path) and os.path.isfile(os.path.join(path, "state")):
            os.remove(os.path.join(path, "state"))
            raise KeyboardInterrupt
        rmtree(path, *args, **kw)
    monkeypatch.setattr(shutil, "rmtree", die_midway)
    with pytest.raises(KeyboardInterrupt):
        run(pydoc, tmp_path, keep_last=1)
    monkeypatch.undo()
    assert not (tmp_path / "step-0000003").exists()            # renamed away before its files went
    # what other kills leave: a half-deleted newest step (config.yaml only), a temp checkpoint, an export's temps
    (tmp_path / "step-0000009").mkdir()
    shutil.copy(tmp_path / "step-0000006" / "config.yaml", tmp_path / "step-0000009")
    for d in (".tmp-step-0000007", ".final.tmp-x1y2", ".final.tmp-x1y2.old"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "model.safetensors").write_bytes(b"partial")
    os.remove(tmp_path / "step-0000006" / train.COMPLETE)      # as written before the marker: still complete
    assert train.latest_checkpoint(tmp_path) == tmp_path / "step-0000006"
    run(pydoc, tmp_path, max_steps=9, keep_last=1, resume="auto")
    assert sorted(scalars(tmp_path)[-1]) == [7, 8, 9]
    assert sorted(os.listdir(tmp_path)) == ["final", "logs", "step-0000009"]


def test_disk_plan_counts_the_checkpoints_kept_and_the_export(tmp_path):
    net = torch.nn.Linear(10, 10, bias=False)                   # 100 fp32 weights: 400 bytes
    opt = torch.optim.AdamW(net.parameters())
    assert train.checkpoint_bytes(net, opt) == 400 + 2 * 400    # AdamW's moments counted before they exist
    net(torch.ones(1, 10)).sum().backward()
    opt.step()
    assert train.checkpoint_bytes(net, opt) == 400 + 2 * 400    # now counted as they are (the 0-dim step is not)
    args = dict(max_steps=10, save_interval=3, keep_last=2, global_batch_size=4, seq_len=32)
    # saves at steps 3, 6, 9, 10; two kept, a third while the next is written
    assert train.disk_plan(0, train.TrainArgs(**args), tmp_path, 1200, 50) == 3 * 1200 + 50
    # keep_last=0 keeps all four; without save_interval only the last step saves
    assert train.disk_plan(0, train.TrainArgs(**{**args, "keep_last": 0}), tmp_path, 1200, 0) == 4 * 1200
    assert train.disk_plan(0, train.TrainArgs(**{**args, "save_interval": None}), tmp_path, 1200, 0) == 1200
    for step in (3, 6):                                         # resumed at step 6 beside its two checkpoints: one more
        (tmp_path / f"step-{step:07d}").mkdir()
        (tmp_path / f"step-{step:07d}" / train.COMPLETE).touch()
    assert train.disk_plan(6, train.TrainArgs(**args), tmp_path, 1200, 0) == 1200
    assert train.disk_plan(10, train.TrainArgs(**args), tmp_path, 1200, 0) == 0   # nothing left to do


def test_a_full_disk_stops_the_run_before_it_writes(pydoc, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10_000))
    with pytest.raises(OSError, match=r"this run's checkpoints \(0\.\d+ GB each, train.keep_last=2\) and its final "
                                      r"export: .* GB needed in .*, 0\.00 GB free\. Free disk space"):
        run(pydoc, tmp_path)
    assert not list(tmp_path.glob("step-*")) and not list(tmp_path.glob(".tmp-*"))
    # check_disk=false only warns at the start; each checkpoint is still refused before any of it is written
    with pytest.warns(UserWarning, match="this run's checkpoints"), \
            pytest.raises(OSError, match=r"the checkpoint of step-0000003: .* GB needed"):
        run(pydoc, tmp_path / "warned", check_disk=False)
    # the disk fills during the run: the next checkpoint is refused before any of it is written
    monkeypatch.setattr(train, "disk_plan", lambda *args: 0)
    with pytest.raises(OSError, match=r"the checkpoint of step-0000003: .* GB needed"):
        run(pydoc, tmp_path / "later")
    assert not list((tmp_path / "later").glob("step-*")) and not list((tmp_path / "later").glob(".tmp-*"))


def test_nan_loss_stops_at_its_step_and_keeps_the_last_checkpoint(pydoc, tmp_path, monkeypatch):
    forward, calls = train.GPT.forward, []

    def nan_at_step_5(self, *args, **kw):
        logits, loss, aux = forward(self, *args, **kw)
        calls.append(1)
        return logits, (loss * float("nan") if len(calls) == 9 else loss), aux   # step 5's first micro-batch
    monkeypatch.setattr(train.GPT, "forward", nan_at_step_5)
    with pytest.raises(FloatingPointError, match=r"step 5: the loss \(nan\).*not finite.*step-0000003"):
        run(pydoc, tmp_path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-0000003"] and not (tmp_path / "final").exists()
    run(pydoc, tmp_path, resume="auto")                         # the checkpoint is intact: step 4 repeats exactly
    cut, resumed = scalars(tmp_path)
    assert sorted(cut) == [1, 2, 3, 4] and sorted(resumed) == [4, 5, 6] and resumed[4] == cut[4]


class RunsCode:
    """Unpickling it creates a file: a stand-in for a checkpoint that calls os.system."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_resume_refuses_a_checkpoint_that_would_run_code(pydoc, tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    marker, ckpt = tmp_path / "ran", tmp_path / "evil" / "step-0000003"
    ckpt.mkdir(parents=True)
    torch.save({"iter_num": RunsCode(str(marker)), "step": 3}, ckpt / "state")
    with pytest.raises(pickle.UnpicklingError, match=f"{ckpt / 'state'} holds objects other than tensors"):
        run(pydoc, tmp_path / "out", resume=ckpt)
    assert not marker.exists()
    # a sharded (FSDP) checkpoint's .metadata is read with plain pickle by torch.distributed.checkpoint
    dcp.save({"w": torch.ones(3), "lr": 0.1}, checkpoint_id=tmp_path / "shards")
    with open(tmp_path / "shards" / ".metadata", "rb") as f:
        train.MetadataUnpickler(f).load()                       # a real one passes
    (tmp_path / "shards" / ".metadata").write_bytes(pickle.dumps(RunsCode(str(marker))))
    with open(tmp_path / "shards" / ".metadata", "rb") as f, pytest.raises(pickle.UnpicklingError, match="open"):
        train.MetadataUnpickler(f).load()
    assert not marker.exists()
    torch.load(ckpt / "state", weights_only=False)              # the exploit is real: unrestricted loading runs it
    assert marker.exists()


def sharded_rank(group, device, out, preset, T):
    """One of two ranks holding a whole model (random weights, bf16 on CUDA, float32 on a CPU) sharded by
    train.parallelize (FSDP2, as train.py), its routed experts frozen (the 76B's bf16 weights are ~76 GB a GPU and
    its experts' gradients would be as much again). One forward + backward on T tokens (4 packed documents,
    activation checkpointing), then 8 greedy tokens through the cache, and the same sequence's logits without one."""
    from torch.distributed.device_mesh import init_device_mesh

    cuda = device.startswith("cuda")
    c = Config.from_name(preset)
    with torch.device("meta"):
        m = GPT(c).to(torch.bfloat16 if cuda else torch.float32)
    for n, p in m.named_parameters():
        p.requires_grad_(".experts." not in n)
    kernels.checkpoint_blocks(m)
    m = train.parallelize(m, init_device_mesh("cuda" if cuda else "cpu", (2,), mesh_dim_names=("data_parallel",)),
                          mixed=False)
    peak = (lambda: torch.cuda.max_memory_allocated() / 1e9) if cuda else (lambda: float("nan"))
    x = torch.randint(0, c.vocab_size, (1, T), generator=torch.Generator().manual_seed(1)).to(device)
    doc = (torch.arange(T, device=device) * 4 // T)[None]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, loss, aux = m(x, x, doc_ids=doc)
    (loss + c.aux_loss_coef * aux).backward()
    res = dict(loss=loss.item(), aux=aux.item(), step_s=time.perf_counter() - t0, train_peak_gb=peak(),
               grads=[(n, p.grad is not None and bool(torch.isfinite(p.grad.to_local()).all()))
                      for n, p in m.named_parameters() if p.requires_grad],
               expert_grads=sum(p.grad is not None for n, p in m.named_parameters() if ".experts." in n))
    m.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        prompt, steps, toks = x[:, :64], [], []
        cache = m.new_cache(1, 64 + 8)
        logits = m(prompt, cache=cache, last_only=True)[0][:, -1]
        for _ in range(8):
            steps.append(logits.float())
            toks.append(logits.argmax(-1, keepdim=True))
            logits = m(toks[-1], cache=cache)[0][:, -1]
        full = m(torch.cat([prompt] + toks[:-1], 1))[0][0, 63:].float()   # position 63's logits and on
    res.update(tokens=torch.cat(toks, 1).tolist(), cached=torch.cat(steps), uncached=full.cpu(),
               gen_peak_gb=peak())
    res["cached"] = res["cached"].cpu()
    if dist.get_rank(group) == 0:
        torch.save(res, out)


def sharded_run(tmp_path, preset, T, device):
    """sharded_rank on two processes (NCCL, one GPU each; gloo on a CPU): rank 0's results."""
    out = tmp_path / "r.pt"
    kernels.cp_launch(sharded_rank, 2, device, str(out), preset, T)
    return torch.load(out, weights_only=False)


def test_sharded_model_trains_a_step_and_decodes_cpu(tmp_path):
    """The code of the GPU suite's whole-76B run, on tiny-moe over two gloo processes: finite losses, a gradient for
    every trainable parameter and none for the frozen experts, the cached decode's logits the no-cache forward's."""
    r = sharded_run(tmp_path, "tiny-moe", 256, "cpu")
    assert math.isfinite(r["loss"]) and math.isfinite(r["aux"]) and r["expert_grads"] == 0
    assert r["grads"] and all(ok for _, ok in r["grads"]), [n for n, ok in r["grads"] if not ok][:5]
    assert len(r["tokens"][0]) == 8
    torch.testing.assert_close(r["cached"], r["uncached"], rtol=1e-4, atol=1e-5)

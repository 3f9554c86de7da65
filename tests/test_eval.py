"""eval.py: the spike sweep (baseline first, spike_k restored afterwards) and the `spikes` command on float and
W8ASpike checkpoints, with its user errors."""
import os
import subprocess
import sys

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

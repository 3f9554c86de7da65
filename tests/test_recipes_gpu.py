"""The recipes' own commands on GPUs (`python -m pytest -m gpu`): train.py with configs/cpt-7b-8k.yaml and
configs/cpt-76b-8k.yaml as documented, shrunk only by appended overrides (2 layers at the real widths, the demo
tokenizer's vocabulary, a few steps), on packed documents with masks, bf16-mixed and activation checkpointing as the
recipes set them; a run killed with SIGKILL after a checkpoint and resumed with --resume auto repeats the losses of an
uninterrupted run bit for bit, on one GPU and with FSDP2 on two; generate.py --compile true on a converted checkpoint
prints what the eager run prints; the whole 76B sharded over two GPUs trains a step and decodes."""
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data import prepare
from model import GPT, Config
from test_convert import make_qwen
from test_train import TOK, scalars, sharded_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# the recipes at their real widths, 2 layers deep (one of each mixer kind) and the demo tokenizer's 2048 tokens
SHRINK_7B = dict(n_layer=2, layout=["gla", "swa"], vocab_size=2048)
SHRINK_76B = dict(n_layer=2, layout=["la+swa", "la+fa"], moe_layers=[1], n_expert=2, vocab_size=2048)


def overrides(shrink):
    return [a for k, v in shrink.items()
            for a in (f"--model_config.{k}", "[" + ", ".join(map(str, v)) + "]" if isinstance(v, list) else str(v))]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "pydoc"   # a quarter for validation: more than one row of 8k tokens
    prepare(inputs=["pydoc"], out=out, tokenizer_dir=TOK, val_fraction=0.25)
    return out


def init_checkpoint(path, preset, shrink):
    """What `convert.py qwen2.5 --to PRESET` would write, at the shrunk depth and vocabulary (random weights)."""
    from convert import save_checkpoint

    if not path.exists():
        torch.manual_seed(0)
        config = Config.from_name(preset, **shrink)
        save_checkpoint(GPT(config).to(torch.bfloat16), config, path, TOK)
    return path


def recipe(config, init, data, out, shrink, devices, *more):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config), *overrides(shrink),
            "--init_from", str(init), "--tokenizer_dir", str(TOK), "--data.path", str(data), "--out_dir", str(out),
            "--devices", str(devices), "--train.global_batch_size", "2", "--train.warmup_steps", "2",
            "--train.log_interval", "1", "--eval.interval", "1000", "--eval.max_batches", "1", *more]


def env():
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "NCCL_NVLS_ENABLE": "0"}


def check(p):
    assert p.returncode == 0, (p.stdout or "")[-2000:] + (p.stderr or "")[-4000:]
    return p


def call(cmd, timeout, **kw):
    """subprocess.run(cmd) checked; past `timeout` seconds the run is killed and the test fails with the last of its
    output (train.py's progress lines say how far it got), not only the time."""
    try:
        return check(subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, **kw))
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-2000:], (e.stderr or b"")[-4000:]
        pytest.fail(f"{' '.join(map(str, cmd[:4]))} ... did not finish in {timeout} s; its last output:\n" +
                    "\n".join(t.decode(errors="replace") if isinstance(t, bytes) else t for t in tail))


FAST = ("--train.compile", "true", "--train.activation_checkpointing", "auto")   # the speed options (README)


@pytest.mark.parametrize("devices, extra", [(1, ()), (2, ()), (2, FAST)], ids=["1", "2", "2-compiled-auto"])
def test_cpt_7b_recipe_killed_and_resumed_repeats_the_losses(devices, extra, data, tmp_path):
    if torch.cuda.device_count() < devices:
        pytest.skip(f"needs {devices} GPUs")
    init = init_checkpoint(tmp_path / "init", "spikingbrain-7b", SHRINK_7B)
    cmd = recipe("cpt-7b-8k.yaml", init, data, "{out}", SHRINK_7B, devices, "--train.max_steps", "16",
                 "--train.save_interval", "8", *extra)
    run = [c.replace("{out}", str(tmp_path / "whole")) for c in cmd]
    check(subprocess.run(run, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900))
    whole = scalars(tmp_path / "whole")[0]
    assert sorted(whole) == list(range(1, 17))

    cut = tmp_path / "cut"
    partial_cmd = [c.replace("{out}", str(cut)) for c in cmd]
    p = subprocess.Popen(partial_cmd, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    t0 = time.time()
    while not (cut / "step-0000008").is_dir():   # a step directory appears (by rename) only when complete
        assert p.poll() is None, p.stderr.read()[-4000:]
        assert time.time() - t0 < 600, "no checkpoint at step 8 within 10 minutes"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)   # the whole process group: Fabric's workers too
    p.wait()
    assert not (cut / "final").exists()
    check(subprocess.run(partial_cmd + ["--resume", "auto"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                         timeout=900))
    resumed = scalars(cut)[-1]
    assert sorted(resumed) == list(range(9, 17))
    assert all(resumed[s] == whole[s] for s in resumed), (resumed, whole)   # bit for bit
    assert (cut / "final" / "model.safetensors").is_file()


def test_cpt_76b_recipe_trains_with_sinks_and_packed_documents(data, tmp_path):
    init = init_checkpoint(tmp_path / "init", "spikingbrain-76b", SHRINK_76B)
    out = tmp_path / "out"
    call(recipe("cpt-76b-8k.yaml", init, data, out, SHRINK_76B, 1, "--train.max_steps", "2"), 420, cwd=tmp_path)
    losses = scalars(out)[0]
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert scalars(out, "moe/max_load.blocks.1.mlp")[0]
    shutil.rmtree(out)


def test_generate_compiled_equals_eager_on_a_converted_checkpoint(tmp_path):
    src, ckpt = tmp_path / "qwen", tmp_path / "sb7b"
    make_qwen(src, vocab_size=2048, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=256, max_position_embeddings=4096)
    check(subprocess.run([sys.executable, str(ROOT / "convert.py"), "qwen2.5", "--src", str(src), "--to",
                          "spikingbrain-7b", "--out", str(ckpt)],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300))
    import pydoc_data.topics
    prompt = pydoc_data.topics.topics["assert"][:1500]    # a few hundred tokens: flex_attention prefill on CUDA
    outs = []
    for compile in ("false", "true"):
        p = check(subprocess.run([sys.executable, str(ROOT / "generate.py"), "--ckpt", str(ckpt), "--tokenizer", str(TOK),
                                  "--prompt", prompt,
                                  "--temperature", "0", "--max_new_tokens", "24", "--dtype", "float32",
                                  "--compile", compile], cwd=tmp_path, env=env(), capture_output=True, text=True,
                                 timeout=600))
        outs.append(p.stdout)
    assert outs[0] == outs[1] and outs[0].strip()


@pytest.mark.parametrize("preset", ["spikingbrain-7b", "spikingbrain-76b"])
def test_generate_split_prefill_on_two_gpus_equals_one(preset, tmp_path):
    """generate.py --cp 2 (NCCL, one GPU each: flex_attention over the sinks, the keys gathered from the rank before
    and the slice's own; the GLA state passed on) prints the one-GPU greedy reply, for the 7B layout and the 76B's
    (sinks, la+fa, MoE), converted from a Qwen2 checkpoint; also in rounds (the cache broadcast between them)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    src, ckpt = tmp_path / "qwen", tmp_path / "sb"
    make_qwen(src, vocab_size=2048, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=256, max_position_embeddings=4096)
    check(subprocess.run([sys.executable, str(ROOT / "convert.py"), "qwen2.5", "--src", str(src), "--to", preset,
                          "--out", str(ckpt)], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300))
    import pydoc_data.topics
    prompt = pydoc_data.topics.topics["assert"][:3000]    # several tiles of 128 tokens on each GPU
    outs = []
    for cp, chunk in (("1", "32768"), ("2", "32768"), ("2", "200")):   # 200: rounds of 400 tokens, the cache shared
        p = check(subprocess.run([sys.executable, str(ROOT / "generate.py"), "--ckpt", str(ckpt), "--tokenizer",
                                  str(TOK), "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "24",
                                  "--dtype", "float32", "--cp", cp, "--prefill_chunk", chunk], cwd=tmp_path,
                                 env=env(), capture_output=True, text=True, timeout=600))
        outs.append(p.stdout)
    assert outs[0] == outs[1] == outs[2] and outs[0].strip()


def test_whole_76b_on_two_gpus(tmp_path):
    """The whole 76B over two H200s (FSDP2): finite loss and balance loss, a finite gradient for every trainable
    parameter and none for the frozen experts, and greedy decoding through the cache whose logits are the no-cache
    forward's within bf16 noise. Prints the step time and the peak memory a GPU."""
    if torch.cuda.device_count() < 2 or torch.cuda.get_device_properties(0).total_memory < 120e9:
        pytest.skip("needs 2 GPUs of >= 120 GB (bf16 weights alone are ~76 GB a GPU)")
    r = sharded_run(tmp_path, "spikingbrain-76b", 8192, "cuda")
    print({k: v for k, v in r.items() if k in ("loss", "aux", "step_s", "train_peak_gb", "gen_peak_gb", "tokens")})
    assert math.isfinite(r["loss"]) and math.isfinite(r["aux"]) and r["expert_grads"] == 0
    assert r["grads"] and all(ok for _, ok in r["grads"]), [n for n, ok in r["grads"] if not ok][:5]
    # pure bf16 (no fp32 weights): each of the 56 residual additions and the few roundings inside each sublayer add
    # an independent relative error of up to 2^-9, a random walk of ~sqrt(56 * 5) * 2^-9 = 3.3% per computation,
    # 4.6% between two computations in different orders (cached: recurrent GLA and one-token attention; uncached:
    # chunked). 10% is twice that; a wrong cache (positions, states) leaves unrelated logits, ~140% apart.
    err = (r["cached"] - r["uncached"]).norm() / r["uncached"].norm()
    assert err < 0.1, err

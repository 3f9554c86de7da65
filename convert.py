"""Checkpoint formats: ours (a directory: model.safetensors + config.yaml + tokenizer files), and conversions.

    python convert.py qwen2.5 --src DIR --to spikingbrain-7b --out DIR
"""
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from model import GPT, Config

TOKENIZER_FILES = ("tokenizer.tiktoken", "tokenizer.json")


def save_checkpoint(model_or_state, config, out, tokenizer_dir=None):
    """Write our checkpoint directory atomically: build it under a temp name, then rename over `out`."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
        config.to_yaml(os.path.join(tmp, "config.yaml"))
        if tokenizer_dir is not None:
            for f in TOKENIZER_FILES:
                shutil.copy(os.path.join(tokenizer_dir, f), tmp)
        if os.path.exists(out):
            old = tmp + ".old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(path, device="cpu", dtype=None):
    """Our checkpoint directory -> (model, config). Errors name what is missing or mis-shaped."""
    cfg_file, w_file = os.path.join(path, "config.yaml"), os.path.join(path, "model.safetensors")
    if not os.path.isdir(path) or not os.path.isfile(cfg_file) or not os.path.isfile(w_file):
        raise FileNotFoundError(f"{path} is not a checkpoint directory: need config.yaml and model.safetensors "
                                f"(train.py writes them; `python convert.py` makes them from Hugging Face files)")
    config = Config.from_yaml(cfg_file)
    with torch.device("meta"):
        model = GPT(config)
    try:
        state = load_file(w_file, device=str(device))
    except Exception as e:
        raise ValueError(f"{w_file} cannot be read as safetensors ({e}); the file is corrupt or truncated") from None
    check_state(model, state, w_file)
    model.load_state_dict(state, assign=True)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval(), config


def check_state(model, state, source):
    """One error listing every missing, unexpected and mis-shaped tensor."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k} {have[k]}" for k in sorted(set(have) - set(want))]
    problems += [f"shape of {k}: file {have[k]}, model {want[k]}" for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    if problems:
        raise ValueError(f"{source} does not match the config ({len(problems)} problems):\n  " + "\n  ".join(problems))

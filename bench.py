"""Speed and memory benchmarks (GPU). Every figure is printed beside a baseline measured in the same run.

    python bench.py kernels   # GLA kernels: ours vs fla vs pure PyTorch vs SDPA
    python bench.py ttft      # time to first token: spikingbrain-7b vs qwen2.5-7b
    python bench.py decode    # decode tok/s and memory vs context length
    python bench.py train     # training tokens/s and MFU
"""
import sys


def bench_kernels(*, T: tuple[int, ...] = (4096, 16384, 65536), B: int = 1, H: int = 28, D: int = 128) -> None:
    raise NotImplementedError


def bench_ttft() -> None:
    raise NotImplementedError


def bench_decode() -> None:
    raise NotImplementedError


def bench_train() -> None:
    raise NotImplementedError


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI({"kernels": bench_kernels, "ttft": bench_ttft, "decode": bench_decode, "train": bench_train})

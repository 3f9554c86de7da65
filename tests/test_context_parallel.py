"""Context parallelism on CPU: one sequence split over 2 and 3 gloo processes gives, slice by slice, the logits,
GLA states and decode cache of one process (float64)."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

T = 23   # divisible by neither 2 nor 3


def tiny(name="tiny", **kw):
    torch.manual_seed(0)
    return M.GPT(M.Config.from_name(name, **kw)).double().eval()


def _worker(rank, world, store, splits):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        idx = torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(1))
        nxt = torch.randint(0, 512, (2, 1), generator=torch.Generator().manual_seed(2))
        for window in (4, 16):   # shorter than a slice, longer than one (the keys before it span several ranks)
            model = tiny(window=window)
            for ends in splits:
                s, e = ([0] + ends)[rank], ends[rank]
                with torch.no_grad():
                    ref_cache = model.new_cache(2, e + 1)
                    ref = model(idx[:, :e], cache=ref_cache)[0]
                    cache = model.new_cache(2, T + 1)
                    logits = model(idx[:, s:e], cache=cache, cp_group=dist.group.WORLD)[0]
                    torch.testing.assert_close(logits, ref[:, s:], rtol=1e-9, atol=1e-11)
                    assert cache.seen == ref_cache.seen == e
                    for i, kind in enumerate(model.config.layout):   # the state after this slice: the prefix's
                        if kind == "gla":
                            torch.testing.assert_close(cache.layers[i].state, ref_cache.layers[i].state,
                                                       rtol=1e-9, atol=1e-12)
                    if rank == world - 1:   # the last rank holds the whole sequence's cache: decode goes on
                        torch.testing.assert_close(model(nxt, cache=cache)[0], model(nxt, cache=ref_cache)[0],
                                                   rtol=1e-9, atol=1e-11)
        with pytest.raises(NotImplementedError, match="prefill only"):
            model(idx[:, :3], cp_group=dist.group.WORLD)                  # gradients would miss the collectives
        with torch.no_grad(), pytest.raises(NotImplementedError, match="full"):
            tiny("tiny-moe")(idx[:, :3], cp_group=dist.group.WORLD)   # sinks and fa layers
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("splits", [
    [[12, 23], [3, 23], [22, 23]],          # 2 ranks: near-even, short first slice, a 1-token last slice
    [[7, 15, 23], [2, 20, 23], [10, 11, 23]],   # 3 ranks: T // 3 per rank and uneven ones, a 1-token middle slice
], ids=["2ranks", "3ranks"])
def test_context_parallel_prefill_matches_one_process(tmp_path, splits):
    world = len(splits[0])
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), splits), nprocs=world)

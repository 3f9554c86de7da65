"""Context parallelism on CPU: one sequence split over 2 and 3 gloo processes gives, slice by slice, the logits,
GLA states and decode cache of one process, and in training its loss and every parameter gradient (float64)."""
import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import model as M  # noqa: E402

T = 23   # divisible by neither 2 nor 3


def tiny(name="tiny", **kw):
    torch.manual_seed(0)
    return M.GPT(M.Config.from_name(name, **kw)).double().eval()


def _init(rank, world, store):
    torch.set_num_threads(1)   # a collective missed by one rank fails after the timeout instead of hanging the test
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _worker(rank, world, store, splits):
    _init(rank, world, store)
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
        for window, layout in ((4, None), (16, None), (16, ["la+swa", "gla", "swa", "la"])):
            _check_training(rank, splits, idx, tiny(window=window, **({"layout": layout} if layout else {})))
        with pytest.raises(NotImplementedError, match="not doc_ids"):   # packed documents would cross ranks
            model(idx[:, :3], doc_ids=torch.zeros_like(idx[:, :3]), cp_group=dist.group.WORLD)
        with torch.no_grad(), pytest.raises(NotImplementedError, match="full"):
            tiny("tiny-moe")(idx[:, :3], cp_group=dist.group.WORLD)   # sinks and fa layers
    finally:
        dist.destroy_process_group()


def _check_training(rank, splits, idx, model):
    """Each rank's loss over its slice, combined (cp_loss), backward on every rank, the gradients summed
    (cp_reduce_grads): one process's loss and gradients, the keys and GLA states read from other ranks having sent
    their gradients back through the gathers."""
    targets = torch.randint(0, 512, idx.shape, generator=torch.Generator().manual_seed(3))
    targets[0, ::4], targets[1, 5:9], targets[:, -1] = -100, -100, -100   # ranks count unequal tokens, or none
    ref_loss = model(idx, targets=targets)[1]
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    for ends in splits:
        s, e = ([0] + ends)[rank], ends[rank]
        model.zero_grad(set_to_none=True)
        loss = model(idx[:, s:e], targets=targets[:, s:e], cp_group=dist.group.WORLD)[1]
        loss = kernels.cp_loss(loss, (targets[:, s:e] != -100).sum(), dist.group.WORLD)
        loss.backward()
        kernels.cp_reduce_grads(model, dist.group.WORLD)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=0)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-9, atol=1e-13, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("splits", [
    [[12, 23], [3, 23], [22, 23]],          # 2 ranks: near-even, short first slice, a 1-token last slice
    [[7, 15, 23], [2, 20, 23], [10, 11, 23]],   # 3 ranks: T // 3 per rank and uneven ones, a 1-token middle slice
], ids=["2ranks", "3ranks"])
def test_context_parallel_matches_one_process(tmp_path, splits):
    world = len(splits[0])
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), splits), nprocs=world)

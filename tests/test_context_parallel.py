"""Context parallelism on CPU: one sequence split over 2 and 3 gloo processes gives, slice by slice, the logits,
GLA states and decode cache of one process (also a prefill in rounds sharing the cache between them), and in
training its loss and every parameter gradient (float64): the 7B layout, packed documents crossing the slices'
edges or starting on one, and sinks, full attention and MoE, also with activation checkpointing."""
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
SPLITS = [
    [[12, 23], [3, 23], [22, 23]],          # 2 ranks: near-even, short first slice, a 1-token last slice
    [[7, 15, 23], [2, 20, 23], [10, 11, 23]],   # 3 ranks: T // 3 per rank and uneven ones, a 1-token middle slice
]


def tiny(name="tiny", **kw):
    torch.manual_seed(0)
    return M.GPT(M.Config.from_name(name, **kw)).double().eval()


def _init(rank, world, store):
    torch.set_num_threads(1)   # a collective missed by one rank fails after the timeout instead of hanging the test
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _entry(rank, world, store, check, splits):
    _init(rank, world, store)
    try:
        check(rank, world, splits)
    finally:
        dist.destroy_process_group()


def spawn(tmp_path, check, splits):
    world = len(splits[0])
    mp.spawn(_entry, args=(world, str(tmp_path / "store"), check, splits), nprocs=world)


def ids():
    return (torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(1)),
            torch.randint(0, 512, (2, 1), generator=torch.Generator().manual_seed(2)))


def packed(ends):
    """Document ids [2, T] for slices ending at `ends`: in row 0 a document crosses every slice edge (the one
    starting 2 tokens before it; a 1-token slice lies inside it), in row 1 one starts exactly on every edge."""
    starts = ([0, 5] + [e - 2 for e in ends[:-1]], [0, 4] + ends[:-1])
    return torch.stack([torch.isin(torch.arange(T), torch.tensor(s)).long().cumsum(0) for s in starts])


def _check_prefill(rank, world, splits, model):
    """Each rank's logits through a fresh cache equal one process's over the prefix ending with its slice; its GLA/LA
    states are the prefix's; the last rank's cache (states, keys, positions) is one process's and decodes alike."""
    idx, nxt = ids()
    for ends in splits:
        s, e = ([0] + ends)[rank], ends[rank]
        with torch.no_grad():
            ref_cache = model.new_cache(2, e + 1)
            ref = model(idx[:, :e], cache=ref_cache)[0]
            cache = model.new_cache(2, T + 1)
            logits = model(idx[:, s:e], cache=cache, cp_group=dist.group.WORLD)[0]
            torch.testing.assert_close(logits, ref[:, s:], rtol=1e-9, atol=1e-11)
            assert cache.seen == ref_cache.seen == e + model.config.n_sink
            for layer, ref_layer in zip(cache.layers, ref_cache.layers):   # the state after this slice: the prefix's
                if hasattr(layer, "state"):
                    torch.testing.assert_close(layer.state, ref_layer.state, rtol=1e-9, atol=1e-12)
            if rank == world - 1:   # the last rank holds the whole sequence's cache: decode goes on
                for (n, a), b in zip(cache.named_buffers(), ref_cache.buffers()):
                    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
                torch.testing.assert_close(model(nxt, cache=cache)[0], model(nxt, cache=ref_cache)[0],
                                           rtol=1e-9, atol=1e-11)


def _check_rounds(rank, world, model):
    """A prefill in rounds (kernels.cp_prefill: each round split over the ranks, every rank taking the last
    rank's cache between rounds) leaves on the last rank the last logits and cache of one process fed the same
    rounds (the cache keeps GLA states in float32 between them), which decode alike: rounds of 1 to 4 tokens a rank,
    so that the window and the sinks lie rounds back."""
    idx, nxt = ids()
    with torch.no_grad():
        for chunk in (1, 2, 4):
            ends = kernels.cp_round_ends(T, world, chunk)
            assert len(ends) >= 2 and min(b - a for a, b in zip([0] + ends, ends)) >= world
            ref_cache = model.new_cache(2, T + 1)
            for a, b in zip([0] + ends, ends):
                ref = model(idx[:, a:b], cache=ref_cache)[0][:, -1]
            cache = model.new_cache(2, T + 1)
            logits = kernels.cp_prefill(model, cache, idx, dist.group.WORLD, chunk)
            if rank < world - 1:
                continue
            torch.testing.assert_close(logits, ref, rtol=1e-9, atol=1e-11)
            assert cache.seen == ref_cache.seen
            for (n, a), b in zip(cache.named_buffers(), ref_cache.buffers()):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"chunk {chunk}, {n}: {m}")
            torch.testing.assert_close(model(nxt, cache=cache)[0], model(nxt, cache=ref_cache)[0], rtol=1e-9,
                                       atol=1e-11)


def _check_packed_logits(rank, splits, model):
    """Logits of packed rows (packed(ends), no cache) on each rank equal one process's over the whole rows."""
    idx, _ = ids()
    for ends in splits:
        s, e, doc = ([0] + ends)[rank], ends[rank], packed(ends)
        with torch.no_grad():
            ref = model(idx, doc_ids=doc)[0]
            got = model(idx[:, s:e], doc_ids=doc[:, s:e], cp_group=dist.group.WORLD)[0]
        torch.testing.assert_close(got, ref[:, s:e], rtol=1e-9, atol=1e-11)


def _check_training(rank, splits, model, docs=False, ref_model=None):
    """Each rank's loss over its slice, combined (cp_loss), plus half the MoE balance loss (the sequence's,
    kernels.cp_balance), backward on every rank, the gradients summed (cp_reduce_grads): one process's loss, balance
    loss and gradients, the keys and GLA states read from other ranks having sent
    their gradients back through the gathers. docs: packed rows (packed(ends), sliced like the tokens). ref_model:
    the one process's model, when not `model` itself (the same weights; checkpoint wrappers' names aside)."""
    ref_model = ref_model or model
    idx, _ = ids()
    targets = torch.randint(0, 512, idx.shape, generator=torch.Generator().manual_seed(3))
    targets[0, ::4], targets[1, 5:9], targets[:, -1] = -100, -100, -100   # ranks count unequal tokens, or none
    for ends in splits:
        s, e, doc = ([0] + ends)[rank], ends[rank], packed(ends) if docs else None
        ref_model.zero_grad(set_to_none=True)
        _, ref_loss, ref_aux = ref_model(idx, targets=targets, doc_ids=doc)
        (ref_loss + 0.5 * ref_aux).backward()                            # aux: the MoE balance loss, or 0
        ref = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
        model.zero_grad(set_to_none=True)
        _, loss, aux = model(idx[:, s:e], targets=targets[:, s:e], doc_ids=None if doc is None else doc[:, s:e],
                             cp_group=dist.group.WORLD)
        loss = kernels.cp_loss(loss, (targets[:, s:e] != -100).sum(), dist.group.WORLD)
        (loss + 0.5 * aux).backward()
        kernels.cp_reduce_grads(model, dist.group.WORLD)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=0)
        torch.testing.assert_close(aux, ref_aux, rtol=1e-9, atol=1e-15)
        for n, p in model.named_parameters():
            n = n.replace("._checkpoint_wrapped_module", "")
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-9, atol=1e-13, msg=lambda m: f"{n}: {m}")


def check_7b_layout(rank, world, splits):
    idx, _ = ids()
    for window in (4, 16):   # shorter than a slice, longer than one (the keys before it span several ranks)
        _check_prefill(rank, world, splits, tiny(window=window))
    for window, layout in ((4, None), (16, None), (16, ["la+swa", "gla", "swa", "la"])):
        _check_training(rank, splits, tiny(window=window, **({"layout": layout} if layout else {})))
    model = tiny()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="input_pos"):
        model(idx[:, :3], input_pos=torch.arange(3).expand(2, 3), cp_group=dist.group.WORLD)
    for impl in ("auto", "flex"):   # flex: CUDA's default, the band's tiles (the ring first where in reach)
        kernels.ATTN_IMPL = impl
        for window in (4, 16):   # a slice of a round past the window, and one whose window reaches into the prefix
            _check_rounds(rank, world, tiny(window=window))
    kernels.ATTN_IMPL = "auto"


def check_packed(rank, world, splits):
    for window in (4, 16):
        model = tiny(window=window)
        _check_packed_logits(rank, splits, model)
        _check_training(rank, splits, model, docs=True)


def check_sinks_fa_moe(rank, world, splits):
    model = tiny("tiny-moe")   # la+swa / la+fa, 4 sinks, MoE
    _check_prefill(rank, world, splits, model)
    _check_rounds(rank, world, model)
    _check_packed_logits(rank, splits, model)
    _check_training(rank, splits, model)
    _check_training(rank, splits, model, docs=True)


def check_checkpointed(rank, world, splits):
    """Activation checkpointing (kernels.checkpoint_blocks, as the recipes train): every rank runs each block's
    forward, gathers included, again in its backward, in the same order; loss and gradients are one process's
    without checkpointing."""
    model = tiny("tiny-moe")
    kernels.checkpoint_blocks(model)
    assert all("_checkpoint_wrapped_module" in n for n, _ in model.blocks.named_parameters())
    _check_training(rank, splits, model, docs=True, ref_model=tiny("tiny-moe"))


def check_all(rank, world, splits):
    """Every check in one set of processes (a spawn costs more than most checks): the 7B layout, packed documents,
    sinks / full attention / MoE; with 3 ranks, activation checkpointing too."""
    for check in (check_7b_layout, check_packed, check_sinks_fa_moe) + ((check_checkpointed,) if world == 3 else ()):
        check(rank, world, splits)


@pytest.mark.parametrize("splits", SPLITS, ids=["2ranks", "3ranks"])
def test_context_parallel_matches_one_process(tmp_path, splits):
    spawn(tmp_path, check_all, splits)

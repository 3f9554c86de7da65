import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pytest  # noqa: E402
import torch  # noqa: E402

import tokenizer  # noqa: E402

# under pytest-xdist (-n N) the workers share the cores: one torch thread each
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


def _interpret_faster():
    """The Triton interpreter (TRITON_INTERPRET=1) patches triton.language anew at every call of a nested
    @triton.jit helper, which our kernels call once per tile: within a launch, which has patched it already, the
    repeat changes nothing but is most of a CPU kernel test's time. Skip the repeat inside a launch; a Triton
    without these internals runs as it is."""
    import triton.language as tl
    from triton.runtime import interpreter as ti
    if not all(hasattr(ti, n) for n in ("_patch_lang", "_LangPatchScope", "GridExecutor", "InterpretedFunction")):
        return
    patch, launch, state = ti._patch_lang, ti.GridExecutor.__call__, {"launch": False, "patched": set()}
    langs = {}   # a module's globals -> the language modules the interpreter patches for its functions

    def patch_once(fn):
        key = id(fn.__globals__)
        if key not in langs:
            langs[key] = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        if state["launch"] and langs[key] <= state["patched"]:
            return ti._LangPatchScope()
        if state["launch"]:   # the launch's own patch (or a helper's from a module that sees other ones), undone
            state["patched"] |= langs[key]   # when the launch ends
        return patch(fn)

    def launched(self, *args, **kwargs):
        state["launch"] = True
        try:
            return launch(self, *args, **kwargs)
        finally:
            state.update(launch=False, patched=set())
    ti._patch_lang, ti.GridExecutor.__call__ = patch_once, launched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpret_faster()

SPECIALS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A byte tokenizer (256 bytes + the ChatML specials): text <-> ids is exact, so tests can state tokens."""
    d = str(tmp_path_factory.mktemp("tok"))
    tokenizer.save(d, {bytes([i]): i for i in range(256)}, SPECIALS)
    return d


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: a second thread only adds synchronization on a busy 2-core
    machine, and a server process started by the tests needs a core of its own."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def dynamo_config():
    """dynamo_config(key=value, ...) sets torch._dynamo.config for one test (its own patch(), undone after the test;
    pytest's monkeypatch would delete the keys of this module on undo)."""
    with contextlib.ExitStack() as stack:
        yield lambda **kw: stack.enter_context(torch._dynamo.config.patch(**kw))

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pytest  # noqa: E402
import torch  # noqa: E402

import tokenizer  # noqa: E402

# under pytest-xdist (-n N) the workers share the cores: one torch thread each
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

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

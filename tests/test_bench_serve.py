"""bench.py serve on CPU (--tiny true): the real serve.py in its own processes, driven by concurrent streaming clients.
Skipped without the serve extra."""
import http.server
import os
import subprocess
import threading

import pytest
import torch

from model import Config

pytest.importorskip("litserve")
pytest.importorskip("openai")
import bench  # noqa: E402


def alive(pgid):
    """Processes of group pgid that have not exited (an orphan that has is left a zombie here until reaped)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):   # not a process, or gone meanwhile
            continue
        if int(group) == pgid and state != "Z":
            out.append(int(d))
    return out


@pytest.mark.slow
def test_bench_serve_tiny(monkeypatch, capsys):
    """README's `python bench.py serve --tiny true`, through bench.py's command line in this process (test_readme.py
    leaves it to this test), its results checked."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # tiny models: the 2 cores go to the servers' processes and the clients
    runs = bench.main(["serve", "--tiny", "true"])
    models, lengths, clients = ("tiny", "tiny-qwen"), (12, 100), (1, 2)
    assert [(r["model"], r["length"], r["clients"]) for r in runs] == \
        [(m, L, n) for m in models for L in lengths for n in clients]
    for r in runs:
        assert len(r["results"]) == r["clients"] and r["prompt_tokens"] == r["length"]
        for c in r["results"]:
            # every client got exactly max_tokens (ignore_eos), one streamed chunk per token (ascii_tokenizer),
            # counted by the server and by the client alike
            assert c["tokens"] == len(c["times"]) == 8 and c["finish"] == "length", c
            assert c["prompt_tokens"] == r["length"]
            assert c["start"] < c["times"][0] and c["times"] == sorted(c["times"])
        assert 0 < r["ttft_p50"] <= r["ttft_p90"] <= r["wall"]
        assert r["server_bytes"] is None                            # no GPU here
        assert not alive(r["server_pid"])                           # the server's processes are gone
    # memory per conversation: full attention's row grows with the context, the hybrid's stops at its SWA ring
    rows = {(r["model"], r["length"]): r["row_bytes"] for r in runs}
    assert rows["tiny-qwen", 100] > rows["tiny-qwen", 12]
    assert rows["tiny", 12] == rows["tiny", 100] == bench.row_bytes(Config.from_name("tiny"), 10**6, torch.float32)
    out = capsys.readouterr().out
    assert out.count("aggregate decode tok/s at 2 clients / at 1") == 4 and "memory per conversation" in out


def test_wait_server_shows_the_warm_up(tmp_path, capsys):
    """bench.py serve waiting for a server: its warm-up lines as they come, a line when none came for `every` seconds,
    and the warm-up's seconds once /health answers."""
    log, ready = tmp_path / "log", threading.Event()
    log.write_text("loading ...\nwarm-up: compiling the prefill\nwarm-up: prefill compiled in 1.5 s\nwarm-up: dec")

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if ready.is_set() else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    def finish():   # the warm-up ends (its last line was half written), then the server answers
        with open(log, "a") as f:
            f.write("ode for 1 row compiled in 0.5 s\nwarm-up: done in 42.0 s\n")
        ready.set()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    proc, timer = subprocess.Popen(["sleep", "60"]), threading.Timer(2.0, finish)
    timer.start()
    try:
        up, warm = bench.wait_server(proc, f"http://127.0.0.1:{httpd.server_address[1]}/v1", str(log), 30, "tiny",
                                     every=1.0)
    finally:
        timer.cancel()
        httpd.shutdown()
        proc.kill()
        proc.wait()
    out = capsys.readouterr().out.splitlines()
    assert warm == 42.0 and 2.0 <= up < 10
    said = [line.split(maxsplit=1)[1] for line in out if "waiting" not in line]
    assert said == ["warm-up: compiling the prefill", "warm-up: prefill compiled in 1.5 s",
                    "warm-up: decode for 1 row compiled in 0.5 s", "warm-up: done in 42.0 s"]
    assert any(line.split() == ["tiny", "waiting", "for", "serve.py:", "1", "s"] for line in out), out

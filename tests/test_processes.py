"""Processes that stop cleanly: a failure on one rank surfaces in seconds with that rank's own error, a hang
or an interrupt stops every process a launch started, and JupyterLab (with its kernels) and the course
site's server leave nothing behind, also when their test fails.

The workers' test-only options plant the failures (``helpers.launch.add_test_options``): ``--fail-rank N``
raises on rank N just before the results are gathered, while the other ranks wait inside the gather;
``--hang-rank N`` sleeps there for ever. Both name the time they struck, so each test measures the time
from the failure to ``launch`` raising (printed: run with ``-s`` to see them). CPU only: gloo processes on
a tiny random-weight Llama. "Nothing left" means no child of this test process and no process whose
command line names this test's own temporary folder (other runs of the workers on the machine are not
this test's business).
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
import urllib.request

import psutil
import pytest
import torch

from helpers.launch import LaunchError, launch, stop

pytestmark = pytest.mark.subprocess

SURFACE_S = 20  # a planted failure must surface within this many seconds (measured: about 2 on 2 busy cores)


def _tiny_checkpoint(path):
    from transformers import LlamaConfig

    from helpers.shapes import random_model

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    random_model(cfg, dtype=torch.float32, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_checkpoint(tmp_path_factory.mktemp("processes") / "tiny")


def _command(worker: str, ckpt, out, *extra) -> list:
    if worker == "replicas":
        args = ["--model", ckpt, "--random-weights", "--prompts", 4, "--new-tokens", 2]
    else:
        args = ["--checkpoint", ckpt, "--cpu"]
    return ["torchrun", "--standalone", "--nproc_per_node=2", f"workers/{worker}.py", "--expect-world-size", 2,
            *args, "--out", out, *extra]


_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before_the_test():
    """The children this process already had (e.g. the session's browser, started by earlier tests)."""
    _BEFORE.clear()
    _BEFORE.update(p.pid for p in psutil.Process().children(recursive=True))
    yield


def _leftovers(marker: str) -> list[str]:
    """Processes still there: children this test started, or any whose command line holds ``marker``."""
    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True) if p.pid not in _BEFORE}
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != me.pid and marker in " ".join(p.info["cmdline"] or []):
            found[p.pid] = p
    left = []
    for pid, p in found.items():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid}: {' '.join(p.cmdline())}")
        except psutil.Error:
            pass
    return left


def _struck(text: str) -> float:
    """The time a planted failure or hang struck, from its message."""
    return float(re.search(r"(?:at|from) time (\d+\.\d+)", text).group(1))


@pytest.mark.parametrize("worker, rank", [("replicas", 1), ("tensor_parallel", 0)])
def test_a_failing_rank_stops_the_group_in_seconds_with_its_own_error(tmp_path, tiny, worker, rank):
    with pytest.raises(LaunchError) as caught:
        launch(_command(worker, tiny, tmp_path / "out.json", "--fail-rank", rank), timeout=300,
               extra_env={"CUDA_VISIBLE_DEVICES": ""})
    failed_in = time.time() - _struck(str(caught.value))
    print(f"\n{worker}: rank {rank}'s planted failure surfaced in {failed_in:.1f} s")
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{worker}.py exited with 1:", lines[0]
    assert lines[1].startswith(f"rank {rank}: RuntimeError: planted failure on rank {rank} (--fail-rank)"), lines
    assert failed_in < SURFACE_S, failed_in
    assert not _leftovers(str(tmp_path)), _leftovers(str(tmp_path))
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("worker", ["replicas", "tensor_parallel"])
def test_a_hung_rank_fails_the_others_after_the_collective_timeout(tmp_path, tiny, worker):
    """Rank 1 sleeps instead of gathering: rank 0's gather gives up after --collective-timeout (gloo's
    timeout, init_process_group(timeout=...)), rank 0 exits with its error and torchrun stops rank 1."""
    wait = 5
    with pytest.raises(LaunchError) as caught:
        launch(_command(worker, tiny, tmp_path / "out.json", "--hang-rank", 1, "--collective-timeout", wait),
               timeout=300, extra_env={"CUDA_VISIBLE_DEVICES": ""})
    failed_in = time.time() - _struck(str(caught.value))
    print(f"\n{worker}: rank 1's planted hang surfaced in {failed_in:.1f} s (collective timeout {wait} s)")
    message = str(caught.value)
    assert "rank 1: planted hang (--hang-rank)" in message
    assert re.search(r"^rank 0: \w+: ", message, re.M), message  # the waiting rank's own error
    assert wait <= failed_in < wait + SURFACE_S, failed_in
    assert not _leftovers(str(tmp_path)), _leftovers(str(tmp_path))


STUBBORN = '''
import os, signal, subprocess, sys, time
rank = int(os.environ["RANK"])
if rank == 1:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends this one
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "MARKER"], start_new_session=True)
print(f"rank {rank}: started", flush=True)
time.sleep(600)
'''


def _stubborn(tmp_path):
    """A torchrun script whose rank 1 ignores SIGTERM and starts a process in a session of its own."""
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN.replace("MARKER", str(tmp_path)))
    return ["torchrun", "--standalone", "--nproc_per_node=2", script]


def _wait_for(what, timeout_s=60):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if what():
            return True
        time.sleep(0.2)
    return False


def test_a_timeout_stops_every_process_and_keeps_what_they_printed(tmp_path):
    timeout = 20
    t0 = time.time()
    with pytest.raises(LaunchError) as caught:
        launch(_stubborn(tmp_path), timeout=timeout)
    took = time.time() - t0
    print(f"\nstopped {took - timeout:.1f} s after the {timeout} s timeout")
    message = str(caught.value)
    assert message.startswith(f"stubborn.py ran past {timeout} s and was stopped"), message
    assert "rank 0: started" in caught.value.stdout and "rank 1: started" in caught.value.stdout
    assert "rank 1: started" in message  # the processes' own lines come first
    assert took < timeout + 15, took  # SIGTERM, 5 s of grace, SIGKILL
    assert not _leftovers(str(tmp_path)), _leftovers(str(tmp_path))


def test_an_interrupt_stops_every_process(tmp_path):
    """The notebook's stop button raises KeyboardInterrupt inside launch: the processes go with it."""
    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 12)
    t0 = time.time()
    try:
        with pytest.raises(KeyboardInterrupt):
            launch(_stubborn(tmp_path), timeout=300)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    took = time.time() - t0
    print(f"\nstopped {took - 12:.1f} s after the interrupt")
    assert took < 12 + 15, took
    assert not _leftovers(str(tmp_path)), _leftovers(str(tmp_path))


def test_stop_ends_a_process_that_ignores_sigterm_and_its_own_session_child(tmp_path):
    from helpers.launch import descendants, start

    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {str(tmp_path)!r}], "
            "start_new_session=True); print('ready', flush=True); time.sleep(600)")
    proc = start([sys.executable, "-c", code, str(tmp_path)], stdout=-1, text=True)
    assert proc.stdout.readline().strip() == "ready"
    known = descendants(proc)
    assert len(known) == 1  # the child in a session of its own
    killed = stop(proc, known, grace_s=1)
    assert set(killed) == {proc.pid, *known}  # neither went on SIGTERM
    assert not _leftovers(str(tmp_path)), _leftovers(str(tmp_path))
    assert stop(proc, known) == []  # a second stop finds nothing to do
    proc.stdout.close()


def test_jupyterlab_stops_with_its_kernels_when_its_test_fails(tmp_path):
    from tests.test_browser_lab import lab_server

    work = tmp_path / "notebooks"
    work.mkdir()
    seen = {}
    with pytest.raises(RuntimeError, match="the test failed"):
        with lab_server(tmp_path, work) as (url, token, server):
            request = urllib.request.Request(f"{url}/api/kernels?token={token}", data=b"{}", method="POST")
            with urllib.request.urlopen(request, timeout=60) as r:
                assert json.loads(r.read())["id"]

            def kernel():
                seen.update({p.pid: p for p in server_children(server) if "ipykernel" in " ".join(p.cmdline())})
                return seen

            assert _wait_for(kernel), "no kernel process appeared"
            raise RuntimeError("the test failed")
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in seen.values()), seen
    assert server.poll() is not None
    assert not _leftovers(str(tmp_path)), _leftovers(str(tmp_path))


def server_children(server) -> list[psutil.Process]:
    try:
        return psutil.Process(server.pid).children(recursive=True)
    except psutil.Error:
        return []


def test_the_site_server_stops_when_its_test_fails(tmp_path):
    from tests.test_browser_site import serve

    (tmp_path / "index.html").write_text("<p>site</p>")
    threads = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="the test failed"):
        with serve(tmp_path) as url:
            with urllib.request.urlopen(url, timeout=10) as r:
                assert b"site" in r.read()
            raise RuntimeError("the test failed")
    with pytest.raises(OSError):  # the port is closed
        urllib.request.urlopen(url, timeout=5)
    assert set(threading.enumerate()) <= threads  # no server thread left

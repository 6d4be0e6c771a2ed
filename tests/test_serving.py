"""helpers.serving: the request check, and a server started, waited for and stopped whatever happens (notebook 07)."""

from __future__ import annotations

import sys
import time

import psutil
import pytest

from helpers.serving import ServerError, check_chat_request, free_port, served

USER = [{"role": "user", "content": "Hi."}]

# A stand-in server: answers GET /health with 200 after START seconds; `--child` first starts a child process in a
# session of its own (as torchrun's workers and Jupyter's kernels do), which must be stopped with it.
FAKE = r"""
import http.server, subprocess, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
start = float(sys.argv[sys.argv.index("--start") + 1])
if "--child" in sys.argv:
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    print("child started", flush=True)
if "--exit" in sys.argv:
    print("cannot load the model", flush=True)
    sys.exit(3)
time.sleep(start)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')
print("listening", flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def fake(*extra, start=0.5):
    return [sys.executable, "-c", FAKE, "--port", free_port(), "--start", start, *extra]


def gone(pids):
    time.sleep(0.2)
    return not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


# -- the check in front of the client ----------------------------------------------------------------------------

@pytest.mark.parametrize("messages, max_tokens, words", [
    ([], 8, "send at least one message"),
    (None, 8, "send at least one message"),
    ([{"content": "Hi."}], 8, "'role'"),
    ([{"role": "robot", "content": "Hi."}], 8, "one of system, user"),
    ([{"role": "user", "content": None}], 8, "text 'content'"),
    (USER, -3, "at least 1"),
    (USER, 0, "at least 1"),
    (USER, 2.5, "whole number"),
    (USER, True, "whole number"),
])
def test_the_check_refuses_what_the_server_mishandles_and_names_the_fix(messages, max_tokens, words):
    with pytest.raises(ValueError, match=words):
        check_chat_request(messages, max_tokens)


def test_the_check_lets_a_good_request_through():
    check_chat_request(USER, 8)
    check_chat_request([{"role": "system", "content": "Be brief."}, *USER])  # max_tokens left to the server


def test_served_needs_a_port():
    with pytest.raises(ValueError, match="free_port"):
        with served(["transformers", "serve", "MODEL"]):
            pass


# -- the server's life: started, ready, stopped ------------------------------------------------------------------

@pytest.mark.subprocess
def test_a_server_is_ready_inside_and_gone_after_the_block():
    with served(fake()) as server:
        assert server.base_url.endswith(f":{server.port}/v1")
        assert psutil.pid_exists(server.pid) and "listening" in server.log()
    assert gone(server.pids)


@pytest.mark.subprocess
def test_an_error_inside_the_block_stops_the_server_and_its_own_session_child():
    with pytest.raises(RuntimeError, match="the cell failed"):
        with served(fake("--child")) as server:
            children = psutil.Process(server.pid).children(recursive=True)
            assert children, "the stand-in started its child"
            raise RuntimeError("the cell failed")
    assert gone([server.pid, *(c.pid for c in children)])


@pytest.mark.subprocess
def test_an_interrupt_inside_the_block_stops_the_server():
    with pytest.raises(KeyboardInterrupt):
        with served(fake()) as server:
            raise KeyboardInterrupt
    assert gone(server.pids)


@pytest.mark.subprocess
def test_a_server_that_exits_at_start_is_reported_with_its_last_lines():
    with pytest.raises(ServerError, match=r"exited with 3 before it was ready(.|\n)*cannot load the model"):
        with served(fake("--exit")):
            pass


@pytest.mark.subprocess
def test_a_server_never_ready_is_stopped_after_the_timeout():
    t0 = time.monotonic()
    command = fake(start=600)
    with pytest.raises(ServerError, match="not ready in 3 s"):
        with served(command, timeout=3):
            pass
    assert time.monotonic() - t0 < 20
    leftover = [p for p in psutil.process_iter(["cmdline"]) if str(command[-3]) in " ".join(p.info["cmdline"] or [])]
    assert gone([p.pid for p in leftover])


# -- the real server, once -----------------------------------------------------------------------------------------

@pytest.mark.subprocess
@pytest.mark.library_text
def test_transformers_serve_answers_the_openai_client_and_a_bare_500_for_no_messages():
    """transformers 5.24's server on the bundled model: an answer, the bare 500 the check exists for, still serving."""
    openai = pytest.importorskip("openai")
    from helpers.checkpoints import resolve_model

    path = str(resolve_model("bundled"))
    with served(["transformers", "serve", path, "--device", "cpu", "--host", "127.0.0.1", "--port", free_port(),
                 "--continuous-batching", "--cb-num-blocks", 16]) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="500"):
            client.chat.completions.create(model=path, messages=[], max_tokens=4)
        client = openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)
        r = client.chat.completions.create(model=path, messages=[{"role": "user", "content": "What is the capital "
                                           "of France?"}], max_tokens=8, temperature=0)
        assert r.choices[0].message.content and r.usage.completion_tokens <= 8
        assert "Cannot apply chat template to an empty conversation" in server.log(400)
    assert gone(server.pids)

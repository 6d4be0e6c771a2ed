"""A server for the length of a ``with`` block: ``transformers serve`` started, waited for, and stopped.

Notebook 07 writes the command line that starts transformers' OpenAI-compatible server in its own cell
(``transformers serve PATH --device cpu --host 127.0.0.1 --port N [--continuous-batching]``) and hands it
to :func:`served`, which only adds what every server a notebook starts needs:

- a process of its own (:func:`helpers.launch.start`: its own session and process group, the repository's
  launch environment, offline), its output in a file rather than a pipe that could fill;
- readiness: ``GET /health`` answers 200 (the model is loaded before the server listens), or a clear error
  with the server's last lines when it exits first or is not ready within ``timeout``;
- the end: on leaving the block, also on an error inside it or an interrupt (the notebook's stop button),
  the server and every process under it are stopped (:func:`helpers.launch.stop`: SIGTERM, then SIGKILL).

:func:`check_chat_request` is the workbook's own check in front of the client: it refuses what the server
would answer with a bare HTTP 500 (no ``messages``) or would take silently or answer with a bare HTTP 500
(a ``max_tokens`` below 1, with or without ``--continuous-batching``), before anything is sent.
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from helpers.launch import ROOT, descendants, launch_env, start, stop_through_interrupts

ROLES = ("system", "user", "assistant", "tool", "developer")
"""The chat roles the OpenAI chat API accepts."""


class ServerError(RuntimeError):
    """The server exited before it was ready, or was not ready in time. The message ends with its last lines."""


@dataclass
class Server:
    """A running server: where to reach it, its process, and what it printed so far (:meth:`log`)."""

    base_url: str
    port: int
    pid: int
    log_path: Path
    pids: list[int] = field(default_factory=list)  # every process the server ran as, noted while it ran

    def log(self, last: int = 20) -> str:
        """The last ``last`` lines the server printed (stdout and stderr together)."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-last:])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the system picks it). Notebook 07 and tests/test_serving.py."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def served(command: list, timeout: float = 120, host: str = "127.0.0.1") -> Iterator[Server]:
    """Start ``command`` (a ``transformers serve ... --host H --port N`` line), yield once ``/health`` answers 200.

    ``"transformers"`` as the first word runs this Python's own command-line tool
    (``python -m transformers.cli.transformers``), so the server uses the kernel's environment. The port
    is read from ``--port`` (required: :func:`free_port` gives one).

    Raises:
        ValueError: no ``--port`` in the command.
        ServerError: the server exited before it was ready, or was not ready in ``timeout`` seconds; the
            message ends with the server's last lines. Nothing started is left running.
    """
    words = [str(w) for w in command]
    if "--port" not in words:
        raise ValueError("served needs '--port N' in the command: pick one with helpers.serving.free_port()")
    port = int(words[words.index("--port") + 1])
    if words and words[0] == "transformers":
        words = [sys.executable, "-m", "transformers.cli.transformers", *words[1:]]
    base = f"http://{host}:{port}"
    log_path = Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])
    with open(log_path, "wb") as log:
        env = launch_env({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})  # its log line by line, as it happens
        proc = start(words, cwd=ROOT, env=env, stdout=log, stderr=log)
    known: dict = {}
    server = Server(f"{base}/v1", port, proc.pid, log_path)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(f"{base}/health"):
            known = descendants(proc, known)
            if proc.poll() is not None:
                raise ServerError(f"the server exited with {proc.returncode} before it was ready; its last "
                                  f"lines:\n{server.log()}")
            if time.monotonic() > deadline:
                raise ServerError(f"the server was not ready in {timeout:.0f} s (GET {base}/health); its last "
                                  f"lines:\n{server.log()}")
            time.sleep(0.2)
        known = descendants(proc, known)
        server.pids = [proc.pid, *known]
        yield server
    finally:  # also on an error in the with-block and on KeyboardInterrupt
        stop_through_interrupts(proc, descendants(proc, known))
        log_path.unlink(missing_ok=True)  # read it inside the block (Server.log); errors above quote it


def check_chat_request(messages: list, max_tokens: int | None = None) -> None:
    """Refuse, before it is sent, a chat request ``transformers serve`` 5.24 mishandles. Notebook 07.

    - no messages: the server answers HTTP 500 "Internal Server Error" with no reason (its log says
      "Cannot apply chat template to an empty conversation");
    - a message that is not ``{"role": ..., "content": ...}`` with a known role;
    - ``max_tokens`` that is not a whole number of at least 1: with ``--continuous-batching`` a negative one
      is accepted and answered with an empty reply (HTTP 200); without it, the answer is a bare HTTP 500 (an
      error mid-stream when streamed), the reason ("`max_new_tokens` must be greater than 0") only in the log.

    Raises:
        ValueError: naming what is wrong and the fix.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages is {messages!r}: send at least one message, e.g. "
                         "[{'role': 'user', 'content': 'What is the capital of France?'}]")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] is {m!r}: each message is a dict with a 'role' (one of "
                             f"{', '.join(ROLES)}) and a text 'content'")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise ValueError(f"max_tokens is {max_tokens!r}: give a whole number of at least 1 (the new tokens to "
                         "generate), or leave it out for the model's default")

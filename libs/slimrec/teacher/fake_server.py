"""A fault-injecting OpenAI-compatible server on 127.0.0.1, for tests and benchmarks.

``POST /v1/chat/completions`` answers with a three-step rationale built from
the history lines of the prompt (``- title | category | brand``), naming the
first and last titles in step 3, and a ``usage`` block. Faults, chosen per
(prompt, attempt) either by a script or at random with a fixed seed:

``429``        429 with ``Retry-After: retry_after_s``
``500``/``503`` server error (503 also carries Retry-After)
``slow``       answers after ``slow_s`` (beyond a client timeout)
``drop``       closes the connection without answering
``malformed``  200 with a body that is not JSON
``empty``      200 with empty content
``truncated``  200 with half an answer and ``finish_reason=length``

Every request is logged (prompt key, attempt number, fault, status, time);
``answered`` counts, per prompt, the good answers delivered (a ``slow``
answer is not counted: the client has given up on it). With ``api_key`` set,
a request without ``Authorization: Bearer <api_key>`` gets 401; with
``echo_auth`` every error body quotes the Authorization header, like a leaky
gateway, to prove the client redacts it.

Bounded: ``max_requests`` requests (then 503s) and ``max_lifetime_s`` seconds,
after which it shuts itself down. Use as a context manager::

    with FakeOpenAIServer(latency_s=0.05, fault_rate=0.3) as srv:
        base_url = srv.base_url   # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULT_KINDS = ("429", "500", "503", "slow", "drop", "malformed", "empty", "truncated")
TRANSPORT_FAULTS = ("429", "500", "503", "slow", "drop", "malformed")  # retried by the client in-run
MAX_BODY_BYTES = 1 << 20
_LINE_RE = re.compile(r"^- (.+?) \| (.+?) \| (.+)$", re.MULTILINE)


def prompt_key(text: str) -> str:
    """What the server logs a prompt as: sha1 of the user message."""
    return hashlib.sha1(text.encode()).hexdigest()


def default_answer(prompt: str) -> str:
    lines = _LINE_RE.findall(prompt)
    if not lines:
        return "Step 1: The customer buys office products.\nStep 2: Office supplies.\nStep 3: \"Generic Office Item\"."
    first, last = lines[0], lines[-1]
    cats = sorted({c.split(" > ")[-1] for _, c, _ in lines})
    brands = sorted({b for _, _, b in lines if b != "unknown"})
    return (
        f"Step 1: The customer likes {', '.join(cats)}.\n"
        f"Step 2: Categories: {', '.join(cats)}. Brands: {', '.join(brands) or 'any'}.\n"
        f'Step 3: Items: "{first[0]}"; "{last[0]}".'
    )


@dataclass
class RequestRecord:
    key: str
    attempt: int  # 1-based: how many times the server has seen this prompt, this one included
    fault: str  # "ok" or a fault kind
    status: int | None  # None: connection dropped
    t: float  # time.monotonic() when the request arrived


class FakeOpenAIServer:
    def __init__(
        self,
        latency_s: float = 0.0,
        fault_rate: float = 0.0,
        fault_kinds: tuple[str, ...] = TRANSPORT_FAULTS,
        script: dict[str, list[str]] | None = None,
        retry_after_s: float = 0.1,
        slow_s: float = 2.0,
        seed: int = 0,
        api_key: str | None = None,
        echo_auth: bool = False,
        max_requests: int = 100_000,
        max_lifetime_s: float = 600.0,
        answer_fn: Callable[[str], str] = default_answer,
    ):
        unknown = set(fault_kinds) - set(FAULT_KINDS)
        for seq in (script or {}).values():
            unknown |= set(seq) - set(FAULT_KINDS) - {"ok"}
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        self.latency_s = latency_s
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(fault_kinds)
        self.script = dict(script or {})
        self.retry_after_s = retry_after_s
        self.slow_s = slow_s
        self.seed = seed
        self.api_key = api_key
        self.echo_auth = echo_auth
        self.max_requests = max_requests
        self.max_lifetime_s = max_lifetime_s
        self.answer_fn = answer_fn
        self.log: list[RequestRecord] = []
        self.answered: Counter = Counter()
        self.seen: Counter = Counter()
        self.auth_headers: set[str] = set()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection
    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()
            self.answered.clear()

    def keys_requested(self) -> set[str]:
        with self._lock:
            return {r.key for r in self.log}

    def requests_per_s(self) -> float:
        """Arrival rate over the logged requests: (n - 1) / (last - first)."""
        with self._lock:
            ts = sorted(r.t for r in self.log)
        return (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 0.0

    # ------------------------------------------------------------------ behaviour
    def choose_fault(self, prompt: str, key: str, attempt: int) -> str:
        for marker, seq in self.script.items():
            if marker in prompt:
                return seq[attempt - 1] if attempt <= len(seq) else "ok"
        if self.fault_rate > 0:
            rng = random.Random(f"{self.seed}:{key}:{attempt}")
            if rng.random() < self.fault_rate:
                return rng.choice(self.fault_kinds)
        return "ok"


def _make_handler(server: FakeOpenAIServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - stdlib signature; keep test output quiet
            return

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client went away (timeout): nothing to do
                self.close_connection = True

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            if server.echo_auth:
                message += f" (received Authorization: {self.headers.get('Authorization')})"
            self._send(status, json.dumps({"error": {"message": message, "code": status}}).encode(), headers)

        def do_GET(self):  # noqa: N802 - stdlib name
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, json.dumps({"data": [{"id": "fake-teacher"}]}).encode())
            else:
                self._error(404, "not found")

        def do_POST(self):  # noqa: N802 - stdlib name
            t = time.monotonic()
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(min(n, MAX_BODY_BYTES))
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}")
                return
            auth = self.headers.get("Authorization")
            with server._lock:
                if auth:
                    server.auth_headers.add(auth)
            if server.api_key is not None and auth != f"Bearer {server.api_key}":
                self._error(401, "Incorrect API key provided")
                return
            try:
                req = json.loads(raw)
                prompt = next(m["content"] for m in reversed(req["messages"]) if m["role"] == "user")
                all_text = "\n".join(m["content"] for m in req["messages"])
            except (ValueError, KeyError, StopIteration, TypeError):
                self._error(400, "bad request body")
                return
            key = prompt_key(prompt)
            with server._lock:
                server.seen[key] += 1
                attempt = server.seen[key]
                over = len(server.log) >= server.max_requests
                fault = "503" if over else server.choose_fault(prompt, key, attempt)
                rec = RequestRecord(key, attempt, fault, None, t)
                server.log.append(rec)
            if server.latency_s:
                time.sleep(server.latency_s)
            if fault == "drop":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if fault in ("429", "503"):
                rec.status = int(fault)
                self._error(rec.status, "rate limited" if fault == "429" else "overloaded",
                            {"Retry-After": f"{server.retry_after_s:g}"})
                return
            if fault == "500":
                rec.status = 500
                self._error(500, "internal error")
                return
            if fault == "malformed":
                rec.status = 200
                self._send(200, b'{"id": "x", "choices": [{"message": {"content": "Step 1')
                return
            if fault == "slow":
                time.sleep(server.slow_s)
            content = server.answer_fn(prompt)
            finish = "stop"
            if fault == "empty":
                content = ""
            elif fault == "truncated":
                content, finish = content[: len(content) // 2], "length"
            body = {
                "id": f"chatcmpl-{key[:12]}-{attempt}",
                "object": "chat.completion",
                "model": req.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
                "usage": {"prompt_tokens": math.ceil(len(all_text) / 4), "completion_tokens": math.ceil(len(content) / 4)},
            }
            rec.status = 200
            if fault == "ok":
                with server._lock:
                    server.answered[key] += 1
            self._send(200, json.dumps(body).encode())

    return Handler

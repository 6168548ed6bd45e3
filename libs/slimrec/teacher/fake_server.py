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

The Batch API (``teacher.http.api=batch``) is served too: ``POST /v1/files``
(multipart, purpose ``batch``), ``GET /v1/files/{id}`` and
``/v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches`` (newest
first, ``limit``/``after``) and ``GET /v1/batches/{id}``. A batch answers
``in_progress`` to its first ``batch_polls`` polls and ends on the next one,
processing its lines then (the script and fault rate apply per line, as to a
chat request: 200 faults give an output line, the others an error-file line
with that status). ``batch_outcomes`` sets how each created batch ends, in
creation order (then ``completed``): ``expired`` or ``cancelled`` after
``batch_done_lines`` lines (the rest in the error file, code
``batch_expired``/``batch_cancelled``), ``failed`` with no line processed.
``lose_batch_creates`` creates that many batches but drops the connection
instead of answering, as a network would. A request line that is not a POST to
the batch's endpoint, or a repeated custom_id, fails the batch at validation.
``api_log`` records every Files/Batches call; ``billed`` counts, per prompt,
the completions delivered with status 200 over both paths, so a test proves
that no prompt was paid for twice.

Bounded: ``max_requests`` requests (then 503s) and ``max_lifetime_s`` seconds,
after which it shuts itself down. Use as a context manager::

    with FakeOpenAIServer(latency_s=0.05, fault_rate=0.3) as srv:
        base_url = srv.base_url   # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import email.parser
import email.policy
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
from urllib.parse import parse_qs, urlsplit

FAULT_KINDS = ("429", "500", "503", "slow", "drop", "malformed", "empty", "truncated")
TRANSPORT_FAULTS = ("429", "500", "503", "slow", "drop", "malformed")  # retried by the client in-run
ANSWER_FAULTS = ("ok", "slow", "empty", "truncated")  # a batch line with one of these is a 200 in the output file
BATCH_OUTCOMES = ("completed", "expired", "cancelled", "failed")
MAX_BODY_BYTES = 1 << 20
MAX_FILE_BYTES = 64 << 20
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
    via: str = "chat"  # "chat", or "batch:<batch id>" for a line of a batch


@dataclass
class ApiRecord:
    method: str
    path: str  # without the query string
    status: int | None  # None: connection dropped
    batch_id: str | None  # the batch created or polled
    t: float


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
        batch_polls: int = 1,
        batch_outcomes: tuple[str, ...] | list[str] = (),
        batch_done_lines: int = 1,
        lose_batch_creates: int = 0,
    ):
        unknown = set(fault_kinds) - set(FAULT_KINDS)
        for seq in (script or {}).values():
            unknown |= set(seq) - set(FAULT_KINDS) - {"ok"}
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        if set(batch_outcomes) - set(BATCH_OUTCOMES):
            raise ValueError(f"unknown batch outcomes {sorted(set(batch_outcomes) - set(BATCH_OUTCOMES))}")
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
        self.batch_polls = batch_polls
        self.batch_outcomes = list(batch_outcomes)
        self.batch_done_lines = batch_done_lines
        self.lose_batch_creates = lose_batch_creates
        self.log: list[RequestRecord] = []
        self.answered: Counter = Counter()
        self.billed: Counter = Counter()
        self.seen: Counter = Counter()
        self.auth_headers: set[str] = set()
        self.api_log: list[ApiRecord] = []
        self.files: dict[str, dict] = {}  # id -> {"bytes": ..., "object": <file object>}
        self.batches: dict[str, dict] = {}  # id -> batch object (plus "_outcome" and "_polls")
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
        """Forget the request logs and answer counts (``billed`` is kept: it is the bill of the server's life)."""
        with self._lock:
            self.log.clear()
            self.answered.clear()
            self.api_log.clear()

    def batches_created(self) -> list[str]:
        """Ids of the batches created (lost answers included), in order."""
        with self._lock:
            return list(self.batches)

    def batch_ids_polled(self) -> list[str]:
        """The batch id of each logged ``GET /v1/batches/{id}``, in order."""
        with self._lock:
            return [r.batch_id for r in self.api_log if r.method == "GET" and r.batch_id is not None]

    def paid_twice(self) -> dict[str, int]:
        """Prompt keys the server delivered more than one 200 completion for (chat and batch lines together)."""
        with self._lock:
            return {k: n for k, n in self.billed.items() if n > 1}

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

    def completion(self, req: dict, fault: str, key: str, attempt: int) -> dict:
        """The chat.completion body of a 200 answer to ``req`` (fault ``ok``, ``slow``, ``empty`` or
        ``truncated``), counted in ``billed`` (and in ``answered`` for ``ok``)."""
        prompt = next(m["content"] for m in reversed(req["messages"]) if m["role"] == "user")
        all_text = "\n".join(m["content"] for m in req["messages"])
        content = self.answer_fn(prompt)
        finish = "stop"
        if fault == "empty":
            content = ""
        elif fault == "truncated":
            content, finish = content[: len(content) // 2], "length"
        with self._lock:
            self.billed[key] += 1
            if fault == "ok":
                self.answered[key] += 1
        return {
            "id": f"chatcmpl-{key[:12]}-{attempt}",
            "object": "chat.completion",
            "model": req.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": math.ceil(len(all_text) / 4), "completion_tokens": math.ceil(len(content) / 4)},
        }

    # ------------------------------------------------------------------ batches
    def _new_file(self, data: bytes, filename: str, purpose: str) -> dict:
        with self._lock:
            fid = f"file-{len(self.files) + 1:06d}"
            obj = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                   "filename": filename, "purpose": purpose}
            self.files[fid] = {"bytes": data, "object": obj}
        return obj

    def create_batch(self, input_file_id: str, endpoint: str, window: str, metadata: dict | None) -> dict:
        with self._lock:
            bid = f"batch_{len(self.batches) + 1:06d}"
            n = len(self.batches)
            outcome = self.batch_outcomes[n] if n < len(self.batch_outcomes) else "completed"
            b = {"id": bid, "object": "batch", "endpoint": endpoint, "input_file_id": input_file_id,
                 "completion_window": window, "status": "validating", "output_file_id": None,
                 "error_file_id": None, "errors": None, "created_at": int(time.time()), "in_progress_at": None,
                 "completed_at": None, "failed_at": None, "expired_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata or None,
                 "_outcome": outcome, "_polls": 0}
            self.batches[bid] = b
        return b

    def poll_batch(self, bid: str) -> dict:
        """One GET: ``in_progress`` for ``batch_polls`` polls, then the batch ends (its lines are processed)."""
        with self._lock:
            b = self.batches[bid]
            b["_polls"] += 1
            finish = b["status"] in ("validating", "in_progress") and b["_polls"] > self.batch_polls
            if not finish and b["status"] == "validating":
                b["status"], b["in_progress_at"] = "in_progress", int(time.time())
        if finish:
            self._finish_batch(b)
        return b

    def _finish_batch(self, b: dict) -> None:
        now = int(time.time())
        lines, problem = _read_requests(self.files[b["input_file_id"]]["bytes"], b["endpoint"])
        if problem is not None or b["_outcome"] == "failed":
            code, msg = ("invalid_request", problem) if problem else ("batch_failed", "the fake server failed it")
            with self._lock:
                b.update(status="failed", failed_at=now, errors={"object": "list", "data": [
                    {"code": code, "message": msg, "line": None}]})
            return
        n_done = len(lines) if b["_outcome"] == "completed" else min(self.batch_done_lines, len(lines))
        out, err = [], []
        for i, line in enumerate(lines):
            cid, req = line["custom_id"], line["body"]
            rid = f"batch_req_{b['id']}_{i}"
            if i >= n_done:
                code = "batch_expired" if b["_outcome"] == "expired" else "batch_cancelled"
                err.append({"id": rid, "custom_id": cid, "response": None,
                            "error": {"code": code, "message": f"not processed: the batch was {b['_outcome']}"}})
                continue
            prompt = next(m["content"] for m in reversed(req["messages"]) if m["role"] == "user")
            key = prompt_key(prompt)
            with self._lock:
                self.seen[key] += 1
                attempt = self.seen[key]
                fault = self.choose_fault(prompt, key, attempt)
                rec = RequestRecord(key, attempt, fault, None, time.monotonic(), via=f"batch:{b['id']}")
                self.log.append(rec)
            if fault in ANSWER_FAULTS:
                rec.status = 200
                body = self.completion(req, fault, key, attempt)
                out.append({"id": rid, "custom_id": cid, "error": None,
                            "response": {"status_code": 200, "request_id": rid, "body": body}})
            else:
                rec.status = int(fault) if fault.isdigit() else 500
                err.append({"id": rid, "custom_id": cid, "error": None, "response": {
                    "status_code": rec.status, "request_id": rid,
                    "body": {"error": {"message": f"fake {fault}", "type": "server_error"}}}})
        ended = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[b["_outcome"]]
        out_id = self._new_file(_jsonl(out), "output.jsonl", "batch_output")["id"] if out else None
        err_id = self._new_file(_jsonl(err), "errors.jsonl", "batch_output")["id"] if err else None
        with self._lock:
            b.update(status=b["_outcome"], output_file_id=out_id, error_file_id=err_id, **{ended: now},
                     request_counts={"total": len(lines), "completed": len(out), "failed": len(err)})


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _read_requests(data: bytes, endpoint: str) -> tuple[list[dict], str | None]:
    """The request lines of a batch input file, or the reason the batch fails validation."""
    lines, ids = [], set()
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            ok = (isinstance(line.get("custom_id"), str) and line.get("method") == "POST"
                  and line.get("url") == endpoint and isinstance(line["body"]["messages"], list))
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            return [], f"line {n}: not a POST to {endpoint} with a custom_id and a body"
        if line["custom_id"] in ids:
            return [], f"line {n}: custom_id {line['custom_id']!r} repeated"
        ids.add(line["custom_id"])
        lines.append(line)
    return lines, None if lines else "the file holds no request"


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body -> {field name: (filename, bytes)}."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    out = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            out[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return out


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

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization")
            with server._lock:
                if auth:
                    server.auth_headers.add(auth)
            if server.api_key is not None and auth != f"Bearer {server.api_key}":
                self._error(401, "Incorrect API key provided")
                return False
            return True

        def _api(self, method: str, path: str, status: int | None, body: dict | bytes | None = None,
                 batch_id: str | None = None) -> None:
            """Answer a Files/Batches call and log it."""
            with server._lock:
                server.api_log.append(ApiRecord(method, path, status, batch_id, time.monotonic()))
            if status is None:  # drop the connection instead of answering
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            elif status >= 400:
                self._error(status, str(body))
            else:
                self._send(status, body if isinstance(body, bytes) else json.dumps(body).encode())

        def do_GET(self):  # noqa: N802 - stdlib name
            url = urlsplit(self.path)
            path = url.path.rstrip("/")
            if path == "/v1/models":
                self._send(200, json.dumps({"data": [{"id": "fake-teacher"}]}).encode())
                return
            parts = path.split("/")
            if path.startswith(("/v1/files", "/v1/batches")) and not self._authorized():
                return
            if path == "/v1/batches":
                q = parse_qs(url.query)
                limit = int(q.get("limit", ["20"])[0])
                with server._lock:
                    newest = [{k: v for k, v in b.items() if not k.startswith("_")} for b in reversed(server.batches.values())]
                if "after" in q:
                    ids = [b["id"] for b in newest]
                    newest = newest[ids.index(q["after"][0]) + 1 :] if q["after"][0] in ids else []
                page = newest[:limit]
                self._api("GET", path, 200, {"object": "list", "data": page, "has_more": len(newest) > limit,
                                             "first_id": page[0]["id"] if page else None,
                                             "last_id": page[-1]["id"] if page else None})
            elif len(parts) == 4 and parts[2] == "batches":
                if parts[3] not in server.batches:
                    self._api("GET", path, 404, f"no batch {parts[3]}", parts[3])
                    return
                b = server.poll_batch(parts[3])
                self._api("GET", path, 200, {k: v for k, v in b.items() if not k.startswith("_")}, parts[3])
            elif len(parts) in (4, 5) and parts[2] == "files" and parts[3] in server.files:
                f = server.files[parts[3]]
                if len(parts) == 5 and parts[4] == "content":
                    self._api("GET", path, 200, f["bytes"])
                elif len(parts) == 4:
                    self._api("GET", path, 200, f["object"])
                else:
                    self._api("GET", path, 404, f"no route {path}")
            else:
                self._error(404, "not found")

        def _post_file(self, raw: bytes) -> None:
            try:
                fields = _multipart(self.headers.get("Content-Type") or "", raw)
                purpose = fields["purpose"][1].decode()
                filename, data = fields["file"]
            except (KeyError, ValueError, UnicodeDecodeError):
                self._api("POST", "/v1/files", 400, "expected multipart fields purpose and file")
                return
            if purpose != "batch":
                self._api("POST", "/v1/files", 400, f"purpose {purpose!r}: this server takes batch files only")
                return
            self._api("POST", "/v1/files", 200, server._new_file(data, filename or "upload.jsonl", purpose))

        def _post_batch(self, raw: bytes) -> None:
            try:
                req = json.loads(raw)
                fid, endpoint, window = req["input_file_id"], req["endpoint"], req["completion_window"]
            except (ValueError, KeyError, TypeError):
                self._api("POST", "/v1/batches", 400, "expected input_file_id, endpoint, completion_window")
                return
            if fid not in server.files or window != "24h" or endpoint != "/v1/chat/completions":
                self._api("POST", "/v1/batches", 400, f"bad batch request {req}")
                return
            b = server.create_batch(fid, endpoint, window, req.get("metadata"))
            with server._lock:
                lose = server.lose_batch_creates > 0
                if lose:
                    server.lose_batch_creates -= 1
            self._api("POST", "/v1/batches", None if lose else 200,
                      {k: v for k, v in b.items() if not k.startswith("_")}, b["id"])

        def do_POST(self):  # noqa: N802 - stdlib name
            t = time.monotonic()
            n = int(self.headers.get("Content-Length") or 0)
            path = urlsplit(self.path).path.rstrip("/")
            raw = self.rfile.read(min(n, MAX_FILE_BYTES if path == "/v1/files" else MAX_BODY_BYTES))
            if path in ("/v1/files", "/v1/batches"):
                if self._authorized():
                    (self._post_file if path == "/v1/files" else self._post_batch)(raw)
                return
            if path != "/v1/chat/completions":
                self._error(404, f"no route {self.path}")
                return
            if not self._authorized():
                return
            try:
                req = json.loads(raw)
                prompt = next(m["content"] for m in reversed(req["messages"]) if m["role"] == "user")
                "\n".join(m["content"] for m in req["messages"])  # every message must carry text
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
            body = server.completion(req, fault, key, attempt)
            rec.status = 200
            self._send(200, json.dumps(body).encode())

    return Handler

"""Batch teacher: the OpenAI-compatible Batch API (``teacher.http.api=batch``), at batch prices.

A daily refresh does not need answers in seconds, and providers answer a file
of requests within a completion window (24 h) for about half the price. One
run of :meth:`BatchTeacher.answer`:

1. **Resume.** ``teacher_batches`` (one row per request file, see
   :class:`BatchStore`) holds every submission of this teacher_model on this
   API root that is neither ``collected`` nor ``abandoned``. A batch that holds
   pending prompts is polled again, never created again, so a killed run pays
   once. A row still ``submitting`` (the create was sent, its answer never
   recorded) is first looked up by its ``submission_id`` in the batches'
   metadata (``GET /batches``) and only created when the endpoint does not
   know it.
2. **Submit** the pending prompts that no open batch holds: each prompt's
   estimate is reserved in the run's budget at the batch price
   (``http.batch.price_factor`` x the price table) first; then the JSONL
   request file (:func:`request_file`: ``custom_id`` = the prompt_hash, the
   cache key; ``body`` = the synchronous path's chat payload) is uploaded
   (``POST /files``, purpose ``batch``), the row is recorded ``submitting``,
   the batch is created (``POST /batches``) and its id recorded.
3. **Poll** ``GET /batches/{id}`` with backoff (``poll_interval_s``, times
   ``poll_backoff`` after each poll, at most ``poll_max_interval_s``) until the
   batch ends or ``max_wait_s`` has passed; a status change is recorded. A run
   that stops waiting leaves its batches open for the next run.
4. **Collect**: ``output_file_id`` and ``error_file_id`` are downloaded
   (``GET /files/{id}/content``) and each line mapped back by ``custom_id``
   (:func:`parse_result_file`). Answers are yielded for the stage to MERGE
   into ``teacher_rationales``, then the row becomes ``collected``. A line of
   the error file, or a prompt without any line (a batch that ended
   ``failed``, ``expired`` or ``cancelled``), is a failure with its reason.
5. **Retry** failures per ``http.batch.retry_failed``: through the
   synchronous path (:class:`~slimrec.teacher.http_teacher.HttpTeacher`, at
   the full price), in a new batch (``retry_rounds`` per run), or not in this
   run. A prompt's row is yielded once, when it is final: its ``attempts`` count
   every request of the run, and a failure keeps the earlier reasons.

Why aiohttp and not the ``openai`` SDK (not a dependency): the synchronous
path already speaks this API through aiohttp with the project's retry rules
and key redaction, and the SDK retries every request on its own (twice by
default, without an idempotency key), the batch create included (a create
whose answer was lost would be sent again and paid twice), and falls back to ``OPENAI_API_KEY`` and other ``OPENAI_*``
variables when ``http.api_key_env`` names another. :class:`BatchApi` runs the
calls one at a time on a private event loop: a batch run makes a handful of
calls per hour, not thousands per minute.

Field names were checked (a search of published API documentation) against
the Batch API reference as mirrored on Microsoft Learn ("batches create
batch": ``input_file_id``, ``endpoint``, ``completion_window`` "24h" only,
``metadata`` of at most 16 pairs, a file of at most 50,000 requests and
200 MB), the openai-python ``types/batch.py`` model (``status`` one of
validating, failed, in_progress, finalizing, completed, expired, cancelling,
cancelled; ``output_file_id``, ``error_file_id``, ``request_counts`` {total,
completed, failed}, ``errors.data`` [{code, message, line}]) and the
``BatchRequestOutput`` schema of the OpenAPI spec (each output and error line:
``id``, ``custom_id``, ``response`` {``status_code``, ``request_id``, ``body``}
or null, ``error`` {``code``, ``message``} or null). A cancelled batch keeps
partial results in its output file (the cancel endpoint's description), so
every ending status is collected the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd
from pydantic import SecretStr

from slimrec.teacher.budget import Budget, estimate_tokens, request_input_text
from slimrec.teacher.config import TeacherConfig
from slimrec.teacher.http_teacher import (
    ERROR_SNIPPET_CHARS,
    FATAL_STATUS,
    RETRYABLE_STATUS,
    HttpSettings,
    RunStats,
    backoff_delay,
    build_payload,
    parse_completion,
    parse_retry_after,
    redact,
)

log = logging.getLogger(__name__)

TABLE = "teacher_batches"
BATCH_ENDPOINT = "/v1/chat/completions"  # the ``endpoint`` of the batch and the ``url`` of every request line
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})  # the API's ending statuses
CLOSED = frozenset({"collected", "abandoned"})  # slimrec's: nothing left to poll or collect
SUBMISSION_KEY = "slimrec_submission_id"  # the batch metadata key that finds a batch whose create answer was lost
MAX_LIST_PAGES = 10  # GET /batches pages (100 each, newest first) searched for a lost create


# ---------------------------------------------------------------------------------------------- pure helpers
def api_root(base_url: str) -> str:
    """``http://host/v1`` or ``http://host/v1/chat/completions`` -> ``http://host/v1`` (files and batches hang off it)."""
    base = base_url.rstrip("/")
    suffix = "/chat/completions"
    return base[: -len(suffix)] if base.endswith(suffix) else base


def request_line(s: HttpSettings, custom_id: str, prompt: str) -> dict:
    """One line of the request file: the synchronous path's payload as a POST to :data:`BATCH_ENDPOINT`."""
    return {"custom_id": custom_id, "method": "POST", "url": BATCH_ENDPOINT, "body": build_payload(s, prompt)}


def request_file(s: HttpSettings, prompts: list[tuple[str, str]]) -> bytes:
    """``[(custom_id, teacher_prompt), ...]`` -> the JSONL request file (UTF-8, one request per line)."""
    return "".join(json.dumps(request_line(s, cid, p), ensure_ascii=False) + "\n" for cid, p in prompts).encode()


def _line_error(doc: dict) -> str | None:
    """The failure one result line reports, or None for a 200 response."""
    err = doc.get("error")
    if isinstance(err, dict) and (err.get("code") or err.get("message")):
        return f"{err.get('code') or 'error'}: {err.get('message') or ''}".strip()
    resp = doc.get("response")
    if not isinstance(resp, dict):
        return "no response"
    status = resp.get("status_code")
    if status == 200:
        return None
    body = resp.get("body")
    msg = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
    text = msg if msg is not None else json.dumps(body)[:ERROR_SNIPPET_CHARS]
    return f"http {status}: {text}"


def parse_result_line(line: str | bytes) -> tuple[str | None, dict]:
    """One line of an output or error file -> ``(custom_id, result)``.

    ``result`` is the synchronous path's parse (content, finish_reason,
    input_tokens, output_tokens) plus ``error`` (None for an answer), so the
    two paths make the same rows. Example: a line ``{"custom_id": "h1",
    "response": {"status_code": 200, "body": {<chat.completion>}}, "error":
    null}`` -> ``("h1", {content, ..., "error": None})``; an error-file line
    ``{"custom_id": "h2", "response": null, "error": {"code": "batch_expired",
    "message": "..."}}`` -> ``("h2", {"error": "batch_expired: ..."})``.
    """
    try:
        doc = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, {"error": "malformed result line: not JSON"}
    if not isinstance(doc, dict):
        return None, {"error": "malformed result line: not an object"}
    cid = doc.get("custom_id") if isinstance(doc.get("custom_id"), str) else None
    err = _line_error(doc)
    if err is not None:
        return cid, {"error": err}
    parsed, perr = parse_completion(json.dumps(doc["response"].get("body")).encode())
    if perr is not None:
        return cid, {"error": perr}
    return cid, {**parsed, "error": None}


def parse_result_file(data: bytes) -> tuple[dict[str, dict], int]:
    """An output or error file -> (``{custom_id: result}``, lines that name no custom_id)."""
    out: dict[str, dict] = {}
    unnamed = 0
    for raw in data.splitlines():
        if not raw.strip():
            continue
        cid, res = parse_result_line(raw)
        if cid is None:
            unnamed += 1
            continue
        out[cid] = res
    return out, unnamed


def batch_ending(batch: dict) -> str:
    """Why a batch holds no line for a prompt: its status and the messages of ``errors.data``.

    >>> batch_ending({"status": "failed", "errors": {"data": [{"code": "invalid_file", "message": "bad line 3"}]}})
    'batch failed (invalid_file: bad line 3)'
    """
    errs = (batch.get("errors") or {}).get("data") if isinstance(batch.get("errors"), dict) else None
    parts = [f"{e.get('code') or 'error'}: {e.get('message') or ''}".strip() for e in errs or [] if isinstance(e, dict)]
    return f"batch {batch.get('status')}" + (f" ({'; '.join(parts)})" if parts else "")


def turnaround_ms(batch: dict) -> float | None:
    """Milliseconds from the batch's ``created_at`` to its ending (unix seconds), None when unknown."""
    start = batch.get("created_at")
    end = next((batch.get(k) for k in ("completed_at", "expired_at", "failed_at", "cancelled_at") if batch.get(k)), None)
    if not isinstance(start, int | float) or not isinstance(end, int | float):
        return None
    return max(0.0, (end - start) * 1e3)


# ---------------------------------------------------------------------------------------------- HTTP client
class BatchApiError(RuntimeError):
    """A Files or Batches call that failed after its retries. ``status``: the HTTP status (None: no answer);
    ``unknown_outcome``: the server may have acted on it (no answer, 408/409/425/429/5xx)."""

    def __init__(self, message: str, status: int | None = None, unknown_outcome: bool = False):
        super().__init__(message)
        self.status = status
        self.unknown_outcome = unknown_outcome

    @property
    def fatal(self) -> bool:
        """Every later call would fail the same way (key, permissions, or an endpoint without the Batch API)."""
        return self.status in FATAL_STATUS


class BatchApi:
    """The Files and Batches endpoints under ``root``, called one at a time from synchronous code.

    Retries (``http.max_retries``) with the synchronous path's rules: 408,
    409, 425, 429, 5xx, timeouts and dropped connections, exponential backoff
    with equal jitter, ``Retry-After`` honoured up to ``max_retry_after_s``.
    ``create`` is never retried blindly (see :meth:`create`). Error texts go
    through :func:`~slimrec.teacher.http_teacher.redact`.
    """

    def __init__(self, root: str, settings: HttpSettings, api_key: SecretStr | None):
        self.root = root.rstrip("/")
        self.s = settings
        self._key = api_key
        self._rng = random.Random(settings.seed)
        self._loop = asyncio.new_event_loop()
        self._session = None

    def _secrets(self) -> list[str]:
        return [self._key.get_secret_value()] if self._key is not None else []

    def close(self) -> None:
        if self._session is not None:
            self._loop.run_until_complete(self._session.close())
            self._session = None
        self._loop.close()

    def _call(self, method: str, path: str, retry: bool = True, **kw) -> bytes:
        return self._loop.run_until_complete(self._request(method, path, retry, **kw))

    async def _request(self, method: str, path: str, retry: bool, json_body: dict | None = None,
                       upload: tuple[str, bytes] | None = None, params: dict | None = None) -> bytes:
        import aiohttp

        if self._session is None:
            headers = {}
            if self._key is not None and self._key.get_secret_value():
                headers["Authorization"] = "Bearer " + self._key.get_secret_value()
            self._session = aiohttp.ClientSession(headers=headers)
        url = self.root + path
        tries = self.s.max_retries + 1 if retry else 1
        for attempt in range(1, tries + 1):
            status, retry_after = None, None
            kw: dict = {"params": params, "timeout": aiohttp.ClientTimeout(total=self.s.request_timeout_s)}
            if json_body is not None:
                kw["json"] = json_body
            if upload is not None:  # a FormData is spent by one request: built again for each try
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                form.add_field("file", upload[1], filename=upload[0], content_type="application/jsonl")
                kw["data"] = form
            try:
                async with self._session.request(method, url, **kw) as resp:
                    body = await resp.read()
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
                if 200 <= status < 300:
                    return body
                snippet = body[:ERROR_SNIPPET_CHARS].decode("utf-8", "replace").replace("\n", " ")
                err = f"http {status}: {snippet}"
            except TimeoutError:
                err = f"timeout: no answer within {self.s.request_timeout_s:g}s"
            except (aiohttp.ClientError, OSError) as e:
                err = f"connection error: {type(e).__name__}"
            retryable = status is None or status in RETRYABLE_STATUS
            if not retryable or attempt == tries:
                raise BatchApiError(redact(f"{method} {path}: {err}", self._secrets()), status, retryable)
            ra = parse_retry_after(retry_after)
            wait = min(ra, self.s.max_retry_after_s) if ra is not None else backoff_delay(
                attempt, self.s.backoff_base_s, self.s.backoff_max_s, self._rng)
            log.info("teacher batch: %s %s failed (%s); retry %d in %.2fs", method, path,
                     redact(err, self._secrets()), attempt, wait)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, retry: bool = True, **kw) -> dict:
        body = self._call(method, path, retry, **kw)
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BatchApiError(f"{method} {path}: answer is not JSON") from None
        if not isinstance(doc, dict):
            raise BatchApiError(f"{method} {path}: answer is not a JSON object")
        return doc

    def upload(self, data: bytes, filename: str) -> str:
        """``POST /files`` (multipart: purpose=batch, file) -> the file id. Uploads are free: retried."""
        doc = self._json("POST", "/files", upload=(filename, data))
        if not isinstance(doc.get("id"), str):
            raise BatchApiError("POST /files: answer has no file id")
        return doc["id"]

    def create(self, input_file_id: str, submission_id: str, completion_window: str) -> dict:
        """``POST /batches`` -> the batch. Sent once: when no answer comes (or a 408/429/5xx) the batch may
        exist and be running, so the caller looks it up by ``submission_id`` (:meth:`find`) before any
        new create."""
        doc = self._json("POST", "/batches", retry=False, json_body={
            "input_file_id": input_file_id, "endpoint": BATCH_ENDPOINT, "completion_window": completion_window,
            "metadata": {SUBMISSION_KEY: submission_id},
        })
        if not isinstance(doc.get("id"), str):
            raise BatchApiError("POST /batches: answer has no batch id")
        return doc

    def find(self, submission_id: str) -> dict | None:
        """The batch whose metadata carries ``submission_id`` among the newest ``MAX_LIST_PAGES`` pages of
        ``GET /batches``; None when absent or when the endpoint cannot list batches (404/405)."""
        after = None
        for _ in range(MAX_LIST_PAGES):
            params = {"limit": "100", **({"after": after} if after else {})}
            try:
                page = self._json("GET", "/batches", params=params)
            except BatchApiError as e:
                if e.status in (404, 405):
                    log.warning("teacher batch: the endpoint cannot list batches (%s); a lost create cannot be "
                                "found", e)
                    return None
                raise
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            for b in data:
                if (b.get("metadata") or {}).get(SUBMISSION_KEY) == submission_id:
                    return b
            if not page.get("has_more") or not data:
                return None
            after = data[-1].get("id")
        return None

    def retrieve(self, batch_id: str) -> dict:
        """``GET /batches/{id}``."""
        return self._json("GET", f"/batches/{batch_id}")

    def content(self, file_id: str) -> bytes:
        """``GET /files/{id}/content``: an output or error file."""
        return self._call("GET", f"/files/{file_id}/content")


# ---------------------------------------------------------------------------------------------- state table
class BatchStore:
    """The rows of ``teacher_batches``: read and written only here, through the lake.

    A row is a dict of the table's columns without the lineage ones (the lake
    fills ``run_date`` and ``input_versions`` from ``info()`` on every write).
    Each :meth:`save` is one MERGE on ``submission_id``.
    """

    def __init__(self, lake, info: Callable[[], object]):
        self.lake = lake
        self._info = info

    def open_rows(self, teacher_model: str, root: str) -> list[dict]:
        """Submissions of ``teacher_model`` on ``root`` not yet collected or abandoned, newest first."""
        if not self.lake.exists(TABLE):
            return []
        df = self.lake.read_pandas(TABLE, filters=[("teacher_model", "=", teacher_model)])
        df = df[(df["base_url"] == root) & ~df["status"].isin(list(CLOSED))]
        rows = []
        for r in df.sort_values("created_ts", ascending=False).to_dict("records"):
            r.pop("run_date", None)
            r.pop("input_versions", None)
            r = {k: (None if _is_na(v) else v) for k, v in r.items()}
            r["custom_ids"] = [str(x) for x in r["custom_ids"]]
            for k in ("round", "request_count", "completed_count", "failed_count"):
                r[k] = None if r[k] is None else int(r[k])
            rows.append(r)
        return rows

    def held_prompts(self, teacher_model: str, root: str) -> set[str]:
        """prompt_hashes inside open submissions (what a dry run must not price again)."""
        return {h for r in self.open_rows(teacher_model, root) for h in r["custom_ids"]}

    def save(self, row: dict) -> None:
        row["updated_ts"] = datetime.now(tz=UTC)
        self.lake.write_arrow(TABLE, pd.DataFrame([row]), "merge", self._info())


def _is_na(v) -> bool:
    return v is None or v is pd.NaT or (isinstance(v, float) and v != v)


# ---------------------------------------------------------------------------------------------- the flow
@dataclass
class BatchRunStats(RunStats):
    batches_created: int = 0
    batches_resumed: int = 0
    batches_abandoned: int = 0
    retried_in_batch: int = 0
    retried_chat: int = 0
    in_flight: int = 0  # prompts left in batches still running when the run ended (the next run collects them)
    batch_ids: list[str] = field(default_factory=list)  # every batch polled in this run


@dataclass
class _Active:
    row: dict
    next_poll: float
    wait: float
    last: dict = field(default_factory=dict)  # the last GET /batches/{id} answer


class BatchTeacher:
    """The Batch API behind the interface of the other teachers: ``answer(pending, budget)`` yields lists of
    raw result dicts (see :func:`slimrec.teacher.cache.to_table_rows`).

    ``store``: the :class:`BatchStore`. ``chat_teacher``: makes the synchronous
    teacher for ``retry_failed=chat`` (the stage's starts Ray first). ``hook(event,
    row)`` is called after each recorded step (``submitted``: the row is saved
    ``submitting``; ``created``: with its batch id; ``collected``); a test
    raises from it to stop the flow the way a killed process would.
    """

    def __init__(self, cfg: TeacherConfig, api_key: SecretStr | None, store: BatchStore,
                 chat_teacher: Callable[[], object] | None = None,
                 hook: Callable[[str, dict], None] | None = None):
        self.cfg = cfg
        self.teacher_model = cfg.http.model
        self.system_prompt = cfg.http.system_prompt
        self.root = api_root(cfg.http.base_url)
        self.settings = HttpSettings.for_worker(cfg, 0)
        self.store = store
        self._key = api_key
        self._chat_teacher = chat_teacher
        self._hook = hook or (lambda event, row: None)
        self.run_stats = BatchRunStats()

    def held_prompts(self) -> set[str]:
        return self.store.held_prompts(self.teacher_model, self.root)

    def answer(self, pending: pd.DataFrame, budget: Budget) -> Iterator[list[dict]]:
        """``pending`` (prompt_hash, teacher_prompt) -> batches of raw result dicts, each prompt once, final."""
        run = _Run(self, pending, budget)
        yield from run.go()


class _Run:
    """The state of one :meth:`BatchTeacher.answer` call."""

    def __init__(self, t: BatchTeacher, pending: pd.DataFrame, budget: Budget):
        cfg = t.cfg
        self.t, self.cfg, self.b, self.budget = t, cfg, cfg.http.batch, budget
        self.st = t.run_stats = BatchRunStats()
        self.prompts = dict(zip(pending["prompt_hash"], pending["teacher_prompt"], strict=True))
        self.est_in = {h: estimate_tokens(request_input_text(p, t.system_prompt), cfg.chars_per_token)
                       for h, p in self.prompts.items()}
        self.est_out = min(cfg.est_output_tokens, cfg.http.max_tokens)
        self.attempts: Counter = Counter()  # requests of this run per prompt
        self.reasons: dict[str, str] = {}  # failure awaiting a retry, per prompt
        self.reserved: dict[str, tuple[int, int]] = {}  # budget reservations at the batch price
        self.active: list[_Active] = []
        self.to_chat: list[str] = []
        self.done: set[str] = set()  # prompts already yielded

    # ------------------------------------------------------------------ driver
    def go(self) -> Iterator[list[dict]]:
        st, t0 = self.st, time.perf_counter()
        if not self.prompts:
            return
        api = BatchApi(self.t.root, self.t.settings, self.t._key)
        try:
            try:
                self._resume(api)
                held = {h for a in self.active for h in a.row["custom_ids"]}
                self._submit(api, [h for h in self.prompts if h not in held], 0)
                yield from self._poll_loop(api)
            except BatchApiError as e:
                st.stopped_by = "batch_api_error"
                st.fatal_error = str(e)
                log.error("teacher batch: %s; the run stops (open batches are resumed by the next run)", e)
            if self.to_chat and st.stopped_by != "batch_api_error":
                yield from self._chat_retry()
            # failures whose retry did not happen (budget, fatal error, no rounds left) end here with their reason;
            # prompts in a batch still running are neither: the next run collects them
            running = {h for a in self.active for h in a.row["custom_ids"]}
            left = [h for h in self.reasons if h not in self.done and h not in running]
            if left:
                yield from self._chunks([self._failed(h, self.reasons[h]) for h in left])
        finally:
            st.in_flight = sum(1 for a in self.active for h in a.row["custom_ids"] if h in self.prompts)
            st.wall_s = time.perf_counter() - t0
            api.close()

    def _chunks(self, rows: list[dict]) -> Iterator[list[dict]]:
        n = self.cfg.commit_batch_size
        for i in range(0, len(rows), n):
            chunk = rows[i : i + n]
            self.done.update(r["prompt_hash"] for r in chunk)
            yield chunk

    # ------------------------------------------------------------------ submit and resume
    def _new_row(self, sid: str, ids: list[str], rnd: int, input_file_id: str) -> dict:
        now = datetime.now(tz=UTC)
        return {
            "submission_id": sid, "teacher_model": self.t.teacher_model, "base_url": self.t.root,
            "round": rnd, "status": "submitting", "batch_id": None, "input_file_id": input_file_id,
            "output_file_id": None, "error_file_id": None, "custom_ids": list(ids), "request_count": len(ids),
            "completed_count": None, "failed_count": None, "error": None, "created_ts": now, "updated_ts": now,
        }

    def _submit(self, api: BatchApi, hashes: list[str], rnd: int) -> None:
        """Reserve, upload, record, create, record: one batch per ``max_requests_per_batch`` prompts."""
        sendable = []
        for h in hashes:
            if not self.budget.try_reserve(self.est_in[h], self.est_out, self.b.price_factor):
                self.st.stopped_by = self.budget.stopped_by
                if rnd == 0:  # a retry left unsent ends as a failed row with its reason instead
                    self.st.not_sent += len(hashes) - len(sendable)
                log.warning("teacher batch: budget cap %s reached; %d prompts left unsent", self.budget.stopped_by,
                            len(hashes) - len(sendable))
                break
            self.reserved[h] = (self.est_in[h], self.est_out)
            sendable.append(h)
        for i in range(0, len(sendable), self.b.max_requests_per_batch):
            ids = sendable[i : i + self.b.max_requests_per_batch]
            data = request_file(self.t.settings, [(h, self.prompts[h]) for h in ids])
            sid = uuid.uuid4().hex
            fid = api.upload(data, f"slimrec-{sid}.jsonl")
            row = self._new_row(sid, ids, rnd, fid)
            self.t.store.save(row)  # before the create: a run killed during it looks the batch up, never re-creates blindly
            self.t._hook("submitted", row)
            self._create(api, row)
            self.st.batches_created += 1
            self.st.sent += len(ids)
            log.info("teacher batch: created %s (round %d, %d prompts, file %s, %d bytes)", row["batch_id"], rnd,
                     len(ids), fid, len(data))
            self.t._hook("created", row)

    def _create(self, api: BatchApi, row: dict) -> None:
        try:
            batch = api.create(row["input_file_id"], row["submission_id"], self.b.completion_window)
        except BatchApiError as e:
            if not e.unknown_outcome:
                if not e.fatal:  # refused (a 400: no batch exists): its prompts go in a new file next run
                    row["status"], row["error"] = "abandoned", f"create refused: {e}"
                    self.t.store.save(row)
                raise
            log.warning("teacher batch: create got no clear answer (%s); looking submission %s up", e,
                        row["submission_id"])
            batch = api.find(row["submission_id"])
            if batch is None:
                raise
        self._apply(row, batch)
        self.t.store.save(row)
        self.active.append(_Active(row, time.monotonic() + self.b.poll_interval_s, self.b.poll_interval_s, batch))
        self.st.batch_ids.append(row["batch_id"])

    def _resume(self, api: BatchApi) -> None:
        claimed: set[str] = set()
        for row in self.t.store.open_rows(self.t.teacher_model, self.t.root):
            mine = [h for h in row["custom_ids"] if h in self.prompts and h not in claimed]
            if not mine:
                # every prompt of it is answered (or left the sample): nothing to wait for; what it still
                # answers is not collected (the cache already holds those prompts or no longer wants them)
                row["status"], row["error"] = "abandoned", "none of its prompts is pending any more"
                self.t.store.save(row)
                self.st.batches_abandoned += 1
                continue
            claimed.update(mine)
            if row["batch_id"] is None:  # killed between the create and its record: the batch may exist
                found = api.find(row["submission_id"])
                if found is None:
                    log.info("teacher batch: submission %s was never created; creating it", row["submission_id"])
                    self._create(api, row)
                    self.st.batches_created += 1
                    continue
                log.info("teacher batch: found the batch of submission %s: %s", row["submission_id"], found["id"])
                self._apply(row, found)
                self.t.store.save(row)
            self.st.batches_resumed += 1
            log.info("teacher batch: resuming batch %s (%s, %d of its prompts pending)", row["batch_id"],
                     row["status"], len(mine))
            self.active.append(_Active(row, time.monotonic(), self.b.poll_interval_s))
            self.st.batch_ids.append(row["batch_id"])

    @staticmethod
    def _apply(row: dict, batch: dict) -> bool:
        """Copy a batch object's state into ``row``; True when something worth a commit changed."""
        before = (row["status"], row["batch_id"], row["output_file_id"], row["error_file_id"])
        row["batch_id"] = batch.get("id") or row["batch_id"]
        row["status"] = batch.get("status") or row["status"]
        row["output_file_id"] = batch.get("output_file_id") or row["output_file_id"]
        row["error_file_id"] = batch.get("error_file_id") or row["error_file_id"]
        counts = batch.get("request_counts") if isinstance(batch.get("request_counts"), dict) else {}
        row["completed_count"] = counts.get("completed", row["completed_count"])
        row["failed_count"] = counts.get("failed", row["failed_count"])
        if row["status"] in TERMINAL and row["status"] != "completed":
            row["error"] = batch_ending(batch)
        return before != (row["status"], row["batch_id"], row["output_file_id"], row["error_file_id"])

    # ------------------------------------------------------------------ poll and collect
    def _poll_loop(self, api: BatchApi) -> Iterator[list[dict]]:
        deadline = time.monotonic() + self.b.max_wait_s
        while self.active:
            now = time.monotonic()
            if now >= deadline:
                self.st.stopped_by = "max_wait_s"
                log.warning("teacher batch: stopped waiting after %.0fs; %d batch(es) still running are resumed by "
                            "the next run", self.b.max_wait_s, len(self.active))
                return
            due = [a for a in self.active if a.next_poll <= now]
            if not due:
                time.sleep(max(0.0, min(min(a.next_poll for a in self.active), deadline) - now))
                continue
            for a in due:
                try:
                    a.last = api.retrieve(a.row["batch_id"])
                except BatchApiError as e:
                    if e.status != 404:
                        raise
                    a.last = {"id": a.row["batch_id"], "status": "failed",
                              "errors": {"data": [{"code": "not_found", "message": "the endpoint no longer knows it"}]}}
                if self._apply(a.row, a.last):
                    self.t.store.save(a.row)
                    log.info("teacher batch: %s is %s (%s of %d done)", a.row["batch_id"], a.row["status"],
                             a.row["completed_count"], a.row["request_count"])
                a.wait = min(a.wait * self.b.poll_backoff, self.b.poll_max_interval_s)
                a.next_poll = time.monotonic() + a.wait
                if a.row["status"] in TERMINAL:
                    self.active.remove(a)
                    yield from self._collect(api, a)

    def _collect(self, api: BatchApi, a: _Active) -> Iterator[list[dict]]:
        row, batch = a.row, a.last
        results: dict[str, dict] = {}
        ending = batch_ending(batch) if batch else f"batch {row['status']}"
        for fid in (row["error_file_id"], row["output_file_id"]):  # an answer outranks an error for one id
            if not fid:
                continue
            try:
                data = api.content(fid)
            except BatchApiError as e:
                if e.status != 404:
                    raise
                ending += f"; file {fid} is gone"  # its lines fail below and are retried, not waited for
                continue
            got, unnamed = parse_result_file(data)
            results.update(got)
            if unnamed:
                log.warning("teacher batch: %d lines of file %s name no custom_id", unnamed, fid)
        latency = turnaround_ms(batch)
        final, failed = [], []
        for h in row["custom_ids"]:
            if h not in self.prompts or h in self.done:
                continue
            self.attempts[h] += 1
            self.st.requests += 1
            res = results.get(h)
            est = self.reserved.pop(h, (0, 0))  # (0, 0): paid by an earlier run; counted now
            err = f"{ending}: no result line" if res is None else res["error"]
            if err is not None:
                self.budget.settle(*est, 0, 0, self.b.price_factor)
                failed.append(h)
                self.reasons[h] = self._with_earlier(h, f"failed: batch {row['batch_id']}: {err}")
                continue
            self.budget.settle(*est, res["input_tokens"] or 0, res["output_tokens"] or 0, self.b.price_factor)
            self.reasons.pop(h, None)
            self.st.answered += 1
            final.append({
                "prompt_hash": h, "sent": True, "fatal": False, "content": res["content"],
                "finish_reason": res["finish_reason"], "input_tokens": res["input_tokens"],
                "output_tokens": res["output_tokens"], "error": None, "http_status": 200,
                "attempts": self.attempts[h], "latency_ms": latency, "answered_ts": datetime.now(tz=UTC),
                "price_factor": self.b.price_factor,
            })
        log.info("teacher batch: %s %s: %d answered, %d failed", row["batch_id"], row["status"], len(final), len(failed))
        yield from self._chunks(final)
        row["status"] = "collected"
        self.t.store.save(row)
        self.t._hook("collected", row)
        if not failed:
            return
        how = self.b.retry_failed
        if how == "batch" and row["round"] < self.b.retry_rounds:
            self.st.retried_in_batch += len(failed)
            log.info("teacher batch: %d failed lines of %s go in a new batch (round %d)", len(failed),
                     row["batch_id"], row["round"] + 1)
            self._submit(api, failed, row["round"] + 1)
        elif how == "chat":
            self.to_chat.extend(failed)
        # otherwise the reasons are yielded as failed rows at the end of the run

    def _chat_retry(self) -> Iterator[list[dict]]:
        """The failed lines through the synchronous path: its rows, with this run's batch attempts and reasons."""
        ids = [h for h in self.to_chat if h not in self.done]
        if not ids or self._chat_teacher_missing():
            return
        self.st.retried_chat += len(ids)
        log.info("teacher batch: %d failed lines go through the synchronous path", len(ids))
        teacher = self.t._chat_teacher()
        pending = pd.DataFrame({"prompt_hash": ids, "teacher_prompt": [self.prompts[h] for h in ids]})
        out: list[dict] = []
        for rows in teacher.answer(pending, self.budget):
            for r in rows:
                h, n = r["prompt_hash"], int(r.get("attempts") or 0)
                self.st.requests += n
                r["attempts"] = n + self.attempts[h]
                if r.get("error") is not None:
                    r["error"] = f"{r['error']}; earlier: {self.reasons[h]}"
                    self.st.failed += 1
                else:
                    self.st.answered += 1
                self.reasons.pop(h, None)
                out.append(r)
            yield from self._chunks(out)
            out = []
        cs = teacher.run_stats
        if cs.stopped_by and not self.st.stopped_by:
            self.st.stopped_by = cs.stopped_by
            self.st.fatal_error = cs.fatal_error

    def _chat_teacher_missing(self) -> bool:
        if self.t._chat_teacher is None:
            log.warning("teacher batch: retry_failed=chat but no synchronous teacher was given; failures stay failed")
            return True
        return False

    def _with_earlier(self, h: str, reason: str) -> str:
        earlier = self.reasons.get(h)
        return reason if earlier is None else f"{reason}; earlier: {earlier}"

    def _failed(self, h: str, reason: str) -> dict:
        self.st.failed += 1
        return {"prompt_hash": h, "sent": True, "fatal": False, "content": None, "finish_reason": None,
                "input_tokens": None, "output_tokens": None, "error": reason, "http_status": None,
                "attempts": self.attempts[h], "latency_ms": None, "answered_ts": None}

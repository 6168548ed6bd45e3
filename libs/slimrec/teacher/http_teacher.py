"""HTTP teacher: any OpenAI-compatible ``/chat/completions`` endpoint, sent from Ray actors.

Why actors and not ``ray.data.llm``'s ``HttpRequestProcessorConfig``: in Ray
2.60 that stage retries only 408/429/502/503/504 with a fixed backoff, ignores
``Retry-After``, has no jitter and no per-request timeout setting, keeps no
per-row attempts or latency, and raises when a row runs out of retries (which
fails the whole dataset). The teacher must record every prompt as answered or
failed-with-reason and commit answers while the run is going, so it owns the
loop: a few async Ray actors (``num_workers``, fractional CPUs) each run an
aiohttp session with

* a rate limiter (``requests_per_s``, retries included, no bursts) and a
  semaphore (``max_concurrency``), both split evenly over the actors;
* retries with exponential backoff and equal jitter on 429, 408, 409, 425,
  5xx, timeouts, dropped connections and unreadable JSON, honouring
  ``Retry-After`` (seconds or HTTP date, capped at ``max_retry_after_s``),
  which also pauses the actor's other requests;
* a per-request timeout; 401/403/404 stop the run (key, model or URL wrong).

The driver feeds the actors a little ahead of what they can send, reserving
each prompt's estimated cost in the :class:`~slimrec.teacher.budget.Budget`
first, drains finished rows every fraction of a second and yields them in
batches for the stage to commit. The API key travels to the actors as a
pydantic ``SecretStr`` (its repr is ``**********``) and every error text is
passed through :func:`redact` before it leaves the actor.

Pure helpers (payload, Retry-After, backoff, response parsing, redaction)
are module functions so tests call them without a network.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import pandas as pd
from pydantic import SecretStr

from slimrec.teacher.budget import Budget, estimate_tokens, request_input_text
from slimrec.teacher.config import TeacherConfig

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
FATAL_STATUS = frozenset({401, 403, 404})  # every later request would fail the same way
ERROR_SNIPPET_CHARS = 200


@dataclass(frozen=True)
class HttpSettings:
    """What one worker needs (picklable, no secret): the config's http section with this worker's share of limits."""

    url: str
    model: str
    temperature: float
    max_tokens: int
    system_prompt: str
    requests_per_s: float
    max_concurrency: int
    request_timeout_s: float
    max_retries: int
    backoff_base_s: float
    backoff_max_s: float
    max_retry_after_s: float
    seed: int

    @classmethod
    def for_worker(cls, cfg: TeacherConfig, worker: int) -> HttpSettings:
        h = cfg.http
        n = h.num_workers
        return cls(
            url=chat_completions_url(h.base_url),
            model=h.model,
            temperature=h.temperature,
            max_tokens=h.max_tokens,
            system_prompt=h.system_prompt,
            requests_per_s=h.requests_per_s / n,
            max_concurrency=max(1, h.max_concurrency // n + (1 if worker < h.max_concurrency % n else 0)),
            request_timeout_s=h.request_timeout_s,
            max_retries=h.max_retries,
            backoff_base_s=h.backoff_base_s,
            backoff_max_s=h.backoff_max_s,
            max_retry_after_s=h.max_retry_after_s,
            seed=h.seed * 1000 + worker,
        )


def chat_completions_url(base_url: str) -> str:
    """``http://host/v1`` -> ``http://host/v1/chat/completions`` (a full URL is kept as is)."""
    base = base_url.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def build_payload(s: HttpSettings, prompt: str) -> dict:
    messages = [{"role": "user", "content": prompt}]
    if s.system_prompt:
        messages.insert(0, {"role": "system", "content": s.system_prompt})
    return {"model": s.model, "messages": messages, "temperature": s.temperature, "max_tokens": s.max_tokens}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; None when absent or bad.

    >>> parse_retry_after("2.5"), parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0)
    (2.5, 10.0)
    """
    if value is None or not str(value).strip():
        return None
    v = str(value).strip()
    try:
        return max(0.0, float(v))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: d = min(cap, base * 2**(attempt-1)); wait in [d/2, d].

    ``attempt`` is the 1-based number of the attempt that just failed.
    """
    d = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return d / 2 + rng.uniform(0, d / 2)


def redact(text: str | None, secrets: list[str]) -> str | None:
    """``text`` with every secret (and any 8+ character slice of one, as gateways echo partial keys) masked."""
    if text is None:
        return None
    for s in secrets:
        if not s:
            continue
        text = text.replace(s, "[redacted]")
        if len(s) >= 16:  # masked echoes like "sk-abc...wxyz" still carry the key's head or tail
            for piece in (s[:8], s[-8:]):
                text = text.replace(piece, "[redacted]")
    return text


def parse_completion(body: bytes) -> tuple[dict | None, str | None]:
    """A chat-completions response body -> ``({content, finish_reason, input_tokens, output_tokens}, None)``
    or ``(None, "malformed response: ...")``. Empty content is *not* an error here: it is an answer."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"malformed response: not JSON ({type(e).__name__})"
    if not isinstance(doc, dict) or not isinstance(doc.get("choices"), list) or not doc["choices"]:
        return None, "malformed response: no choices"
    choice = doc["choices"][0]
    if not isinstance(choice, dict):
        return None, "malformed response: bad choice"
    msg = choice.get("message") or {}
    content = msg.get("content") if isinstance(msg, dict) else None
    if content is not None and not isinstance(content, str):
        return None, "malformed response: content is not text"
    usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}

    def _int(x):
        return int(x) if isinstance(x, int | float) and not isinstance(x, bool) else None

    return {
        "content": content or "",
        "finish_reason": choice.get("finish_reason"),
        "input_tokens": _int(usage.get("prompt_tokens")),
        "output_tokens": _int(usage.get("completion_tokens")),
    }, None


class RateLimiter:
    """Evenly spaced slots at ``rate`` per second (no bursts); :meth:`pause` holds every slot until a time."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self._next = 0.0
        self._paused_until = 0.0

    def pause(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._paused_until = max(self._paused_until, loop.time() + seconds)

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            slot = max(now, self._next, self._paused_until)
            self._next = slot + self.interval
            if slot > now:
                await asyncio.sleep(slot - now)
            if loop.time() >= self._paused_until - 1e-6:
                return


class HttpTeacherWorker:
    """One async Ray actor: a queue of prompts, an aiohttp session, the retry loop.

    ``submit(rows)`` starts one task per row; ``drain(wait_s)`` returns the
    rows finished so far (waiting up to ``wait_s`` for at least one);
    ``stop()`` makes rows that have not been sent yet come back ``sent=False``.
    """

    def __init__(self, settings: HttpSettings, api_key: SecretStr | None):
        self.s = settings
        self._key = api_key
        self._rng = random.Random(settings.seed)
        self._done: list[dict] = []
        self._event: asyncio.Event | None = None
        self._session = None
        self._limiter: RateLimiter | None = None
        self._sem: asyncio.Semaphore | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()

    def _secrets(self) -> list[str]:
        return [self._key.get_secret_value()] if self._key is not None else []

    async def _ensure(self) -> None:
        if self._session is None:
            import aiohttp

            self._event = asyncio.Event()
            self._limiter = RateLimiter(self.s.requests_per_s)
            self._sem = asyncio.Semaphore(self.s.max_concurrency)
            headers = {"Content-Type": "application/json"}
            if self._key is not None and self._key.get_secret_value():
                headers["Authorization"] = "Bearer " + self._key.get_secret_value()
            # limit=0: the semaphore bounds concurrency; the pool must not queue behind it.
            connector = aiohttp.TCPConnector(limit=0, force_close=False)
            self._session = aiohttp.ClientSession(headers=headers, connector=connector)

    async def submit(self, rows: list[dict]) -> int:
        await self._ensure()
        for row in rows:
            t = asyncio.get_running_loop().create_task(self._run_row(row))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        return len(rows)

    async def drain(self, wait_s: float) -> list[dict]:
        await self._ensure()
        if not self._done:
            try:
                await asyncio.wait_for(self._event.wait(), timeout=wait_s)
            except TimeoutError:
                pass
        out, self._done = self._done, []
        self._event.clear()
        return out

    async def stop(self) -> int:
        self._stopping = True
        return len(self._tasks)

    async def close(self) -> None:
        self._stopping = True
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.s.request_timeout_s + 1)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _finish(self, row: dict, **fields) -> None:
        out = {"prompt_hash": row["prompt_hash"], "sent": True, "fatal": False, "content": None,
               "finish_reason": None, "input_tokens": None, "output_tokens": None, "error": None,
               "http_status": None}
        out.update(fields)
        out["error"] = redact(out["error"], self._secrets())
        self._done.append(out)
        self._event.set()

    async def _post(self, payload: dict) -> tuple[int | None, bytes, str | None, str | None, float]:
        """One request: (status, body, retry_after header, transport error, latency ms)."""
        import aiohttp

        t0 = time.perf_counter()
        try:
            timeout = aiohttp.ClientTimeout(total=self.s.request_timeout_s)
            async with self._session.post(self.s.url, json=payload, timeout=timeout) as resp:
                body = await resp.read()
                return resp.status, body, resp.headers.get("Retry-After"), None, (time.perf_counter() - t0) * 1e3
        except TimeoutError:
            err = f"timeout: no answer within {self.s.request_timeout_s:g}s"
        except aiohttp.ClientPayloadError as e:
            err = f"connection error: {type(e).__name__}"
        except aiohttp.ClientError as e:
            err = f"connection error: {type(e).__name__}: {e}"
        except OSError as e:
            err = f"connection error: {type(e).__name__}"
        return None, b"", None, err, (time.perf_counter() - t0) * 1e3

    async def _run_row(self, row: dict) -> None:
        payload = build_payload(self.s, row["teacher_prompt"])
        attempts = 0
        error = None
        status = None
        latency = None
        try:
            for attempt in range(1, self.s.max_retries + 2):
                async with self._sem:
                    await self._limiter.acquire()
                    # Checked after the waits: a stop (fatal status, budget) must catch queued rows too.
                    if self._stopping:
                        if attempts == 0:
                            self._finish(row, sent=False, attempts=0, latency_ms=None)
                        else:
                            self._finish(row, attempts=attempts, latency_ms=latency, http_status=status,
                                         error=f"failed: run stopped after {attempts} attempt(s); last: {error}")
                        return
                    attempts += 1
                    status, body, retry_after, terr, latency = await self._post(payload)
                wait = None
                if terr is not None:
                    error = terr
                elif status == 200:
                    parsed, perr = parse_completion(body)
                    if perr is None:
                        self._finish(row, attempts=attempts, latency_ms=latency, http_status=200,
                                     answered_ts=datetime.now(tz=UTC), **parsed)
                        return
                    error = perr
                else:
                    snippet = body[:ERROR_SNIPPET_CHARS].decode("utf-8", "replace").replace("\n", " ")
                    error = f"http {status}: {snippet}"
                    if status in FATAL_STATUS or status not in RETRYABLE_STATUS:
                        if status in FATAL_STATUS:
                            self._stopping = True  # every queued row would get the same answer
                        self._finish(row, attempts=attempts, latency_ms=latency, http_status=status,
                                     error=f"failed: {error}", fatal=status in FATAL_STATUS)
                        return
                    ra = parse_retry_after(retry_after)
                    if ra is not None:
                        wait = min(ra, self.s.max_retry_after_s)
                        self._limiter.pause(wait)  # the server asked everyone to slow down, not just this row
                if attempt > self.s.max_retries:
                    break
                if wait is None:
                    wait = backoff_delay(attempt, self.s.backoff_base_s, self.s.backoff_max_s, self._rng)
                await asyncio.sleep(wait)
            self._finish(row, attempts=attempts, latency_ms=latency, http_status=status,
                         error=f"failed: {attempts} attempt(s); last: {error}")
        except Exception as e:  # a bug must become a row status, not a lost row
            self._finish(row, attempts=attempts, latency_ms=latency, error=f"failed: internal {type(e).__name__}: {e}")


@dataclass
class RunStats:
    sent: int = 0
    requests: int = 0
    answered: int = 0
    failed: int = 0
    not_sent: int = 0
    stopped_by: str | None = None
    fatal_error: str | None = None
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class HttpTeacher:
    """Sends prompts through ``num_workers`` Ray actors and yields finished rows in commit-sized batches."""

    def __init__(self, cfg: TeacherConfig, api_key: SecretStr | None):
        self.cfg = cfg
        self.teacher_model = cfg.http.model
        self.system_prompt = cfg.http.system_prompt
        self._key = api_key
        self.run_stats = RunStats()

    def answer(self, pending: pd.DataFrame, budget: Budget) -> Iterator[list[dict]]:
        """``pending`` (prompt_hash, teacher_prompt) -> batches of raw result dicts (see ``_finish``)."""
        import ray

        cfg, h = self.cfg, self.cfg.http
        st = self.run_stats = RunStats()
        t0 = time.perf_counter()
        out_est = min(cfg.est_output_tokens, h.max_tokens)
        queue = deque(
            {
                "prompt_hash": r.prompt_hash,
                "teacher_prompt": r.teacher_prompt,
                "est_in": estimate_tokens(request_input_text(r.teacher_prompt, h.system_prompt), cfg.chars_per_token),
            }
            for r in pending[["prompt_hash", "teacher_prompt"]].itertuples(index=False)
        )
        if not queue:
            return
        est_of = {r["prompt_hash"]: r["est_in"] for r in queue}
        worker_cls = ray.remote(HttpTeacherWorker)
        workers = [
            worker_cls.options(num_cpus=h.worker_num_cpus, max_concurrency=1000).remote(
                HttpSettings.for_worker(cfg, i), self._key
            )
            for i in range(h.num_workers)
        ]
        # Enough queued to keep every slot busy for ~2 s, no more: a stop (budget, fatal) wastes little.
        ahead = max(2 * h.max_concurrency, math.ceil(2 * h.requests_per_s), 4)
        outstanding = 0
        stop = False
        buffer: list[dict] = []
        last_commit = last_progress = time.perf_counter()
        # Longest a row can legitimately take: every attempt timing out plus the longest waits between them.
        stall_s = (h.max_retries + 1) * h.request_timeout_s + h.max_retries * max(h.backoff_max_s, h.max_retry_after_s) + 60
        rr = 0
        try:
            while True:
                feed: list[list[dict]] = [[] for _ in workers]
                while queue and not stop and outstanding < ahead:
                    if not budget.try_reserve(queue[0]["est_in"], out_est):
                        stop = True
                        st.stopped_by = budget.stopped_by
                        log.warning("teacher: budget cap %s reached; %d prompts left unsent", budget.stopped_by, len(queue))
                        break
                    feed[rr % len(workers)].append(queue.popleft())
                    rr += 1
                    outstanding += 1
                    st.sent += 1
                refs = [w.submit.remote(f) for w, f in zip(workers, feed, strict=True) if f]
                if refs:
                    ray.get(refs)
                if outstanding == 0:
                    break
                done = [r for batch in ray.get([w.drain.remote(0.25) for w in workers]) for r in batch]
                now = time.perf_counter()
                if done:
                    last_progress = now
                elif now - last_progress > stall_s:  # a lost row must not hang the run; the rerun resends it
                    log.error("teacher: %d rows made no progress for %.0fs; ending the run", outstanding, stall_s)
                    st.stopped_by = "stalled"
                    break
                for res in done:
                    outstanding -= 1
                    est_in = est_of[res["prompt_hash"]]
                    if not res["sent"]:
                        st.not_sent += 1
                        st.sent -= 1
                        budget.settle(est_in, out_est, 0, 0)
                        continue
                    st.requests += res["attempts"]
                    budget.settle(est_in, out_est, res["input_tokens"] or 0, res["output_tokens"] or 0)
                    if res["error"] is None:
                        st.answered += 1
                    else:
                        st.failed += 1
                    if res["fatal"] and not stop:
                        stop = True
                        st.stopped_by = "fatal_http_status"
                        st.fatal_error = res["error"]
                        log.error("teacher: endpoint refused a request (%s); stopping the run", res["error"])
                        ray.get([w.stop.remote() for w in workers])
                    buffer.append(res)
                now = time.perf_counter()
                if len(buffer) >= cfg.commit_batch_size or (buffer and now - last_commit >= cfg.commit_interval_s):
                    out, buffer = buffer[: cfg.commit_batch_size], buffer[cfg.commit_batch_size :]
                    last_commit = now
                    yield out
            if buffer:
                yield buffer
        finally:
            st.not_sent += len(queue)
            st.wall_s = time.perf_counter() - t0
            for w in workers:
                try:
                    ray.get(w.close.remote(), timeout=h.request_timeout_s + 5)
                except Exception as e:  # closing is best effort; the actor is killed next anyway
                    log.debug("teacher worker close: %s", type(e).__name__)
                ray.kill(w)

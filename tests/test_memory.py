"""Handing memory back between stages (slimrec.memory)."""

from __future__ import annotations

import gc
import signal
import weakref

import pytest
from slimrec.memory import fit_and_release, release_free_heap, shrink_jvm_heap


class _Handle:
    """Stands for a Ray actor handle: the actor lives while something references it."""


class _TrainerLike:
    """What Ray Train 2.60's ``fit`` does with its controller: a SIGINT handler whose closure holds it."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.controller = None

    def fit(self):
        controller = _Handle()
        self.controller = weakref.ref(controller)

        def handler(signum, frame):
            return controller

        signal.signal(signal.SIGINT, handler)
        if self.fail:
            raise RuntimeError("training failed")
        return "result"


def test_fit_and_release_drops_the_handler_that_holds_the_controller():
    before = signal.getsignal(signal.SIGINT)
    plain = _TrainerLike()
    assert plain.fit() == "result"
    gc.collect()
    assert plain.controller() is not None  # what Ray does alone: the handler keeps the controller alive
    signal.signal(signal.SIGINT, before)

    t = _TrainerLike()
    assert fit_and_release(t) == "result"
    assert signal.getsignal(signal.SIGINT) is before
    assert t.controller() is None


def test_fit_and_release_restores_the_handler_when_fit_fails():
    before = signal.getsignal(signal.SIGINT)
    t = _TrainerLike(fail=True)
    with pytest.raises(RuntimeError, match="training failed"):
        fit_and_release(t)
    assert signal.getsignal(signal.SIGINT) is before
    assert t.controller() is None


def test_release_free_heap_returns_freed_pages_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")

    def rss_kib() -> int:
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])

    blocks = [bytearray(4000) for _ in range(100_000)]  # 400 MB of small blocks: glibc's heap, not mmap
    pin = bytearray(4000)  # a live block above them: free() alone cannot shrink the heap's top
    for b in blocks:
        b[::512] = b"\x01" * len(b[::512])  # touch every page
    full = rss_kib()
    del blocks
    gc.collect()
    assert rss_kib() > full - 50_000  # freed, but kept by glibc (4.7 MB of 400 went back here)
    assert release_free_heap() is True
    assert rss_kib() < full - 200_000  # at least 200 MB of the 400 went back
    assert len(pin) == 4000


def test_shrink_jvm_heap_never_raises_for_a_session_without_a_jvm(caplog):
    class NoJvm:
        @property
        def _jvm(self):
            raise RuntimeError("gateway closed")

    with caplog.at_level("DEBUG", logger="slimrec.memory"):
        shrink_jvm_heap(NoJvm())
    assert "System.gc() failed" in caplog.text


def test_stage_context_collects_only_a_jvm_it_started(monkeypatch):
    """Between stages ``slim run`` collects the JVM of a session its context started, never one it joined."""
    from datetime import date

    import slimrec.memory as memory
    from slimrec.config import load_config
    from slimrec.lake import Lake
    from slimrec.stages.base import StageContext

    calls = []
    monkeypatch.setattr(memory, "shrink_jvm_heap", lambda spark: calls.append(spark))
    cfg = load_config("tiny")
    session = object()
    for owned in (True, False):
        ctx = StageContext(cfg=cfg, lake=Lake("unused"), run_date=date(2026, 1, 1), _spark=session, _spark_owned=owned)
        ctx.release_memory()
    StageContext(cfg=cfg, lake=Lake("unused"), run_date=date(2026, 1, 1)).release_memory()  # no session yet
    assert calls == [session]


def test_a_collection_returns_the_spark_drivers_garbage(spark):
    """The JVM's used heap after :func:`shrink_jvm_heap` is below what a query's garbage left."""
    rt = spark._jvm.java.lang.Runtime.getRuntime()
    rows = spark.range(300_000).selectExpr("id", "cast(id as string) as s").collect()  # garbage in the driver JVM
    assert len(rows) == 300_000
    used = rt.totalMemory() - rt.freeMemory()
    shrink_jvm_heap(spark)
    assert rt.totalMemory() - rt.freeMemory() < used

"""Handing memory back to the machine between the pipeline's steps.

A long batch job on one machine runs its stages in turn, and what one stage's
processes freed but kept is memory the next stage cannot have. Three holders
measured in ``make run`` (``python -m bench.pipeline``, per-process RSS at each
stage's peak):

* :func:`release_free_heap`: glibc keeps the pages a process freed in its arenas
  (xgrammar's per-row parser states, the KV cache and activations of a generation
  batch); ``malloc_trim(0)`` returns them. One student generation actor held
  1,194 MB after two batches of 128 constrained prompts, 701 MB after the trim.
* :func:`shrink_jvm_heap`: the local Spark driver's JVM grows its heap to what its
  busiest query needed and keeps it; a full collection lets G1 give the unused
  part back (1,402 MB -> 846 MB after the Spark stages of the bundled data).
* :func:`fit_and_release`: Ray Train's ``fit`` leaves its controller actor alive
  until the next ``fit`` (see there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import signal
import threading

log = logging.getLogger(__name__)

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    return _LIBC


def release_free_heap() -> bool:
    """Collect Python's garbage and return the C heap's free pages to the OS (glibc ``malloc_trim``).

    False where the C library has no ``malloc_trim`` (musl, macOS): nothing is done there.
    """
    gc.collect()
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc else None
    if trim is None:
        return False
    trim(0)
    return True


def shrink_jvm_heap(spark) -> None:
    """A full collection in the Spark driver's JVM, so that its heap shrinks to what it holds.

    For a JVM started by this process (local mode, where the driver's heap is this machine's memory);
    a failure is logged, never raised: it only costs memory.
    """
    try:
        spark._jvm.java.lang.System.gc()
    except Exception as e:  # noqa: BLE001 - a JVM that cannot collect is left as it is
        log.debug("Spark driver JVM: System.gc() failed (%s)", e)


def fit_and_release(trainer):
    """``trainer.fit()`` (a Ray Train trainer), without leaving its controller actor alive afterwards.

    Ray Train 2.60's ``fit`` registers a SIGINT handler whose closure holds the controller's handle
    (``DataParallelTrainer._register_sigint_handler``), and a handler stays registered until the next
    one replaces it: the ``ray::TrainController`` process (0.45 GiB) outlived ``distill_student``
    through every later stage of ``make run``. The handler in place before ``fit`` comes back after it
    (main thread only, where ``fit`` registers one), which drops the last handle and ends the actor.
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if main and before is not None:
            signal.signal(signal.SIGINT, before)
        gc.collect()

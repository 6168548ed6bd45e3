"""Grammar-constrained decoding of the student with xgrammar, for HF ``generate`` on CPU or GPU.

The grammar is the EBNF of :func:`slimrec.rationale_shape.grammar_ebnf`; the
same text goes to vLLM's structured outputs on the GPU path, whose pinned
version (0.32.0) requires ``xgrammar==0.2.8``, the version pinned here.

* :func:`require_xgrammar`: the library or a :class:`ConstraintUnavailable`
  that says how to install it. Constrained decoding never falls back to
  unconstrained decoding silently: ``student.infer.constrained=false`` is the
  only way to turn it off.
* :class:`StudentGrammar`: the grammar compiled once against the student's
  tokenizer (in each actor's ``__init__``); :meth:`StudentGrammar.processor`
  gives one :class:`GrammarLogitsProcessor` per ``generate`` call.
* :class:`GrammarLogitsProcessor`: a ``transformers.LogitsProcessor`` that
  masks every token the grammar does not allow (one xgrammar matcher per row,
  all rows filled in one batched call). A row for which no token of the
  vocabulary continues the grammar (a tokenizer that cannot spell a title) is
  a dead end: it is ended with the end token and reported in ``dead``, so the
  stage writes it with a status and a reason instead of losing it.
* Words counted by the decoder (``StudentGrammar(words=WordBudget)``, what the stage does): the grammar
  leaves the words of steps 1 and 2 uncounted, in number and in length (``grammar_ebnf(count_words=False)``),
  and the processor masks every token that would take a step past its word limit or a word past its
  characters, from per-token tables; the same answers as the grammar that counts them, for under a quarter
  of the parser's memory and about a seventh of its time per mask.
* Overlap (``StudentGrammar.overlap``, on by default): :meth:`GrammarLogitsProcessor.generate_kwargs`
  also gives ``generate`` a stopping criterion that sees each sampled token first and starts accepting
  it and filling the next mask on a worker thread (xgrammar releases the GIL), while the model computes
  the next step's logits; the processor then only waits for that mask. Without the criterion (a bare
  ``logits_processor=[proc]``) the processor does the same work in its own call.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)

XGRAMMAR_PIN = "xgrammar==0.2.8"


class ConstraintUnavailable(RuntimeError):
    """Constrained decoding was asked for and its library cannot be used."""


def require_xgrammar():
    """The ``xgrammar`` module, or :class:`ConstraintUnavailable` with the reason and the fix."""
    try:
        import xgrammar
    except Exception as e:  # noqa: BLE001 - an ImportError or a broken native library: both are "cannot constrain"
        raise ConstraintUnavailable(
            f"student.infer.constrained=true needs xgrammar, which failed to load ({type(e).__name__}: {e}); "
            f"install it ({XGRAMMAR_PIN}) or set student.infer.constrained=false to decode unconstrained"
        ) from e
    return xgrammar


def word_budget(shape: dict | None):
    """The :class:`~slimrec.rationale_shape.WordBudget` of a shape given as a dict (None: the grammar counts its
    words itself)."""
    if shape is None:
        return None
    from slimrec.rationale_shape import RationaleShape, WordBudget

    return WordBudget(RationaleShape(**shape))


class StudentGrammar:
    """An EBNF grammar compiled for one tokenizer; ``compile_seconds`` and ``memory_bytes`` say what it cost.

    ``vocab_size`` is the model's output size (the logits' last dimension),
    which may exceed the tokenizer's: the extra ids are never allowed.
    """

    def __init__(self, ebnf: str, tokenizer, vocab_size: int, threads: int = 2, overlap: bool = True,
                 words=None):
        xgr = require_xgrammar()
        self._xgr = xgr
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("constrained decoding needs a tokenizer with an end token (eos_token_id)")
        self.eos = int(eos)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[self.eos])
        t0 = time.perf_counter()
        compiler = xgr.GrammarCompiler(info, max_threads=max(1, threads), cache_enabled=False)
        self.compiled = compiler.compile_grammar(ebnf)
        self.compile_seconds = time.perf_counter() - t0
        self.memory_bytes = int(self.compiled.memory_size_bytes)
        self.vocab_size = vocab_size
        self.threads = max(1, threads)
        self.overlap = overlap
        self._pool: ThreadPoolExecutor | None = None
        self.words = words
        if words is not None:
            self._word_tables(words, info.decoded_vocab, vocab_size)
        log.info("student grammar compiled in %.2f s (%.1f MB, %d EBNF chars, vocab %d%s)",
                 self.compile_seconds, self.memory_bytes / 1e6, len(ebnf), vocab_size,
                 ", words of steps 1 and 2 counted by the decoder" if words is not None else "")

    def _word_tables(self, words, vocab: list[bytes], vocab_size: int) -> None:
        """Tensors of :meth:`slimrec.rationale_shape.WordBudget.token_tables` over the model's ids
        (ids past the tokenizer's never add a space: the grammar never allows them)."""
        import torch

        vocab = list(vocab[:vocab_size]) + [b""] * max(0, vocab_size - len(vocab))
        added, lead, over = words.token_tables(vocab)
        self.vocab_bytes = vocab
        self.word_added = torch.tensor(added, dtype=torch.int16)  # (2 steps, label bytes left + 1, V)
        self.word_lead = torch.tensor(lead, dtype=torch.int16)
        self.word_passes = torch.tensor(over, dtype=torch.bool)  # passes a limit by itself
        self.word_limits = torch.tensor(words.limits, dtype=torch.int16)  # (2,) spaces per body

    def processor(self, states: list | None = None, steps: int = 0,
                  holds_last: bool = False) -> GrammarLogitsProcessor:
        """A processor for one ``generate`` call; ``states`` (one per row, from an earlier call's
        :meth:`GrammarLogitsProcessor.row_state`) continue rows whose earlier pass ended unfinished,
        ``holds_last``: that call's :attr:`GrammarLogitsProcessor.holds_last`."""
        return GrammarLogitsProcessor(self, states, steps, holds_last)

    def pool(self) -> ThreadPoolExecutor:
        """The one worker thread that prepares masks ahead (created on first use)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimrec-grammar")
        return self._pool


def _logits_processor_base():
    from transformers import LogitsProcessor

    return LogitsProcessor


class GrammarLogitsProcessor(_logits_processor_base()):
    """Masks disallowed tokens for every row of one ``generate`` call (make a new one per call).

    ``dead``: row -> reason, for rows the grammar could not continue; those rows
    were ended with the end token at that step. ``matchers``: the rows' grammar
    states after the call (read them after :meth:`finish`). ``holds_last``: whether
    those states hold the call's last sampled token (a mask was prepared ahead for a
    step that never came) or not (a call's last token is sampled after its last
    mask). Given to a new processor with ``holds_last``, they continue those rows:
    unless they hold it, its first step accepts that token (the last of the prompt
    it is given, which must be the row's prompt and everything generated so far)
    before masking. ``steps``: tokens the rows already have, for the dead-end reasons.
    """

    def __init__(self, grammar: StudentGrammar, states: list | None = None, steps: int = 0,
                 holds_last: bool = False):
        self.g = grammar
        self.matchers: list = [m for m, _ in states] if states else []
        # WordBudget states, when the grammar leaves words to the decoder
        self.words: list = [w for _, w in states] if states and grammar.words is not None else []
        self.word_over = None  # (rows, mask) of the next step: tokens that would pass a word limit
        self.resume = bool(states)
        self.holds_last = holds_last and self.resume
        self.batch = None
        self.bitmask = None
        self.steps = steps
        self.dead: dict[int, str] = {}
        self._next: Future | None = None  # the next step's mask, being prepared on the grammar's worker thread

    def generate_kwargs(self) -> dict:
        """``generate`` arguments: this processor and, with ``grammar.overlap``, the stopping criterion
        that starts each next mask as soon as a token is sampled (it never stops a row)."""
        kw: dict = {"logits_processor": [self]}
        if self.g.overlap:
            from transformers import StoppingCriteriaList

            kw["stopping_criteria"] = StoppingCriteriaList([_PrepareAhead(self)])
        return kw

    def row_state(self, i: int) -> tuple:
        """Row ``i``'s grammar state and word count, to continue it in a later call (:meth:`StudentGrammar.processor`)."""
        return self.matchers[i], self.words[i] if self.words else None

    def keep_rows(self, keep: list[int]) -> None:
        """Go on with only the rows ``keep`` (their positions in the batch, in order), which become rows
        0..len(keep)-1: a decoder that drops ended rows from its batch calls this between two steps, after
        the step's mask was applied and before the next one is prepared."""
        if self._next is not None:
            raise RuntimeError("keep_rows() while the next mask is being prepared")
        self.matchers = [self.matchers[i] for i in keep]
        if self.words:
            self.words = [self.words[i] for i in keep]
        self.dead = {k: self.dead[i] for k, i in enumerate(keep) if i in self.dead}
        self.bitmask = self.g._xgr.allocate_token_bitmask(len(keep), self.g.vocab_size)
        self.word_over = None

    def _live(self) -> list[int]:
        return [i for i in range(len(self.matchers)) if i not in self.dead and not self.matchers[i].is_terminated()]

    def _accept(self, last: list[int]) -> None:
        """Feed each live row's ``last`` token (sampled after the previous mask) to its matcher."""
        live = self._live()
        if not live:
            return
        tokens = [last[i] for i in live]
        accepted = self.g._xgr.BatchGrammarMatcher.batch_accept_token([self.matchers[i] for i in live], tokens)
        for i, ok, tok in zip(live, accepted, tokens, strict=True):
            if not ok:
                self.dead[i] = f"grammar dead end: token {tok} rejected after {self.steps} tokens"
            elif self.words:
                self.words[i], within = self.g.words.advance(self.words[i], self.g.vocab_bytes[tok])
                if not within:
                    self.dead[i] = f"grammar dead end: token {tok} passed a step's word limit after {self.steps} tokens"

    def _prepare(self, last: list[int] | None) -> None:
        """Accept ``last`` (each row's newest token; None: the matchers are already at it) and fill the
        bitmask of the next step; rows with no allowed token become dead ends, allowed only the end token."""
        import torch

        if last is not None:
            self._accept(last)
        self.steps += 1
        live = self._live()
        self.bitmask.fill_(-1)  # finished rows: anything (generate pads them); no all-masked row under sampling
        if live:
            self.batch.batch_fill_next_token_bitmask([self.matchers[i] for i in live], self.bitmask, indices=live)
            allowed_any = self.bitmask[live].ne(0).any(dim=1).tolist()
            for i, ok in zip(live, allowed_any, strict=True):
                if not ok:
                    self.dead[i] = f"grammar dead end: no token continues the rationale after {self.steps - 1} tokens"
        for i in self.dead:  # ended now: only the end token may follow
            self.bitmask[i].zero_()
            self.bitmask[i, self.g.eos // 32] = torch.tensor(1 << (self.g.eos % 32), dtype=torch.int64).to(torch.int32)
        self.word_over = self._word_mask(live) if self.words else None

    def _word_mask(self, live: list[int]):
        """(rows, (rows, V) bool): for the live rows writing step 1 or 2, the tokens that would take the
        step past its word limit or a word past its characters; None when no row is writing either."""
        import torch

        rows = [i for i in live if i not in self.dead and self.words[i][0] < 2]
        if not rows:
            return None
        step, left, spaces, chars = torch.tensor([self.words[i] for i in rows], dtype=torch.int64).T
        over = (self.g.word_added[step, left] + spaces[:, None]) > self.g.word_limits[step][:, None]
        over |= (self.g.word_lead[step, left] + chars[:, None]) > self.g.words.word_max
        return torch.tensor(rows), over | self.g.word_passes[step, left]

    def prepare_ahead(self, input_ids) -> None:
        """Start accepting the newest tokens of ``input_ids`` and filling the next mask on the worker thread."""
        if self.batch is None or self._next is not None:
            return
        self._next = self.g.pool().submit(self._prepare_in_thread, input_ids[:, -1].tolist())

    def _prepare_in_thread(self, last: list[int]) -> None:
        import torch

        with torch.inference_mode():  # thread-local: the bitmask may have been made under generate's
            self._prepare(last)

    def finish(self) -> None:
        """Wait for a mask being prepared ahead (after ``generate`` returns: its states then hold the last token)."""
        if self._next is not None:
            self._next.result()
            self._next = None
            self.holds_last = True

    def __call__(self, input_ids, scores):
        xgr = self.g._xgr
        n = input_ids.shape[0]
        if self.batch is None:  # first step: nothing sampled in this call yet
            self.batch = xgr.BatchGrammarMatcher(max_threads=self.g.threads)
            self.bitmask = xgr.allocate_token_bitmask(n, self.g.vocab_size)  # (B, ceil(V / 32)) int32
            if not self.resume:
                self.matchers = [xgr.GrammarMatcher(self.g.compiled) for _ in range(n)]
                self.words = [self.g.words.start()] * n if self.g.words is not None else []
            elif len(self.matchers) != n:
                raise RuntimeError(f"{len(self.matchers)} grammar states given for a batch of {n} rows")
            # continued rows: the previous pass's last token is the prompt's last, accepted unless already held
            self._prepare(input_ids[:, -1].tolist() if self.resume and not self.holds_last else None)
            self.holds_last = False
        elif n != len(self.matchers):
            raise RuntimeError(f"batch changed from {len(self.matchers)} to {n} rows inside one generate call")
        elif self._next is not None:
            self._next.result()  # prepared while the model ran (re-raises what failed there)
            self._next = None
        else:
            self._prepare(input_ids[:, -1].tolist())
        device = scores.device
        if device.type not in ("cpu", "cuda"):
            scores = scores.to("cpu")
        xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        if self.word_over is not None:
            self._apply_word_limits(scores)
        return scores.to(device)

    def _apply_word_limits(self, scores) -> None:
        """Mask the tokens that would pass a word limit; a row left with no token (no tokenizer seen so far
        needs it: the grammar always allows the newline that ends a step) becomes a dead end."""
        rows, over = self.word_over
        rows = rows.to(scores.device)
        sub = scores.index_select(0, rows).masked_fill_(over.to(scores.device), float("-inf"))
        stuck = _all_masked_rows(sub)
        for j in stuck:
            i = int(rows[j])
            self.dead[i] = f"grammar dead end: no token continues within the word limits after {self.steps - 1} tokens"
            sub[j].fill_(float("-inf"))
            sub[j, self.g.eos] = 0.0
        scores.index_copy_(0, rows, sub)


def _all_masked_rows(scores) -> list[int]:
    """Indices of the rows of ``scores`` (2-D) where every value is -inf."""
    return scores.isneginf().all(dim=1).nonzero().flatten().tolist()


def _stopping_criteria_base():
    from transformers import StoppingCriteria

    return StoppingCriteria


class _PrepareAhead(_stopping_criteria_base()):
    """A stopping criterion that stops nothing: ``generate`` calls it right after appending each sampled
    token, before the next forward pass, which is when the next mask can start."""

    def __init__(self, proc: GrammarLogitsProcessor):
        self.proc = proc

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.proc.prepare_ahead(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

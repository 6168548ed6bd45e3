"""python -m bench.embed [--rationales 600] [--repeats 1] [--set embed.num_actors=2 ...]

Sentences per second of the embed stage's Ray Data path
(:func:`slimrec.embed.ray_encode.encode_texts`: actor pool start, model load
in the actor, length sort, batches, collection on the driver) against plain
``SentenceTransformer.encode`` in this process, on the same texts, with the
same model and batch size; the plain run uses every core of the machine
(torch threads = cores, or ``--plain-threads``), the Ray path its actors'
threads (``embed.num_actors`` x ``embed.torch_threads``):

* the item texts of ``data/amazon_office_2014`` (title | category path | brand,
  built by the ingest code), short;
* synthetic three-step rationales written from the same catalogue, long
  (about the 137 tokens of the offline teacher's rationales);
* both together, as one stage run encodes them.

Beside both, the stage's own choice (:func:`slimrec.embed.ray_encode.encode`:
the actor pool from ``embed.pool_min_texts`` texts up, below it this process,
model load included): what an embed run of that size costs.

Ray is started before timing (the pipeline starts it once for every stage);
the Ray path's time includes its per-run fixed cost, printed separately
(one text through a fresh actor pool). The baseline's model load is printed
beside it but not counted, since a long-lived process would load once.
Prints a table and the ratio Ray / plain; never asserts times. Wall time on a
shared machine is bent by other processes (a second process gets a second
share of a contended CPU), so CPU time per text is printed beside it: this
process's, plus the encoder actors' for the Ray path. Use ``--repeats 3``
(best of each, run in turns) before quoting a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import resource
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import record, row

log = logging.getLogger("bench.embed")

DATASET = Path(__file__).resolve().parents[1] / "data" / "amazon_office_2014"


def office_items(dataset: Path = DATASET, max_text_chars: int = 2000):
    """items(item_id, title, brand, categories, item_text, ...) exactly as ingest builds them."""
    from slimrec.ingest import normalise_items, read_lcrec

    _, raw_items, _ = read_lcrec(sorted(dataset.glob("*.inter.json")), sorted(dataset.glob("*.item.json")))
    items, _ = normalise_items(raw_items, max_text_chars=max_text_chars, max_id_chars=128)
    return items


def synthetic_rationale(items, rng: random.Random) -> str:
    """A three-step rationale in the project's format, about 130-150 MiniLM tokens, from catalogue rows."""
    rows = items.iloc[rng.sample(range(len(items)), 6)]
    cats = [c[-1] for c in rows["categories"] if len(c)] or ["Office Products"]
    brands = [b for b in rows["brand"] if isinstance(b, str)] or ["various brands"]
    titles = [str(t)[:70] for t in rows["title"]]
    return (
        f"Step 1: The user mostly buys {cats[0].lower()} and {cats[-1].lower()}, favouring {brands[0]}"
        f" and {brands[-1]}; recent purchases such as \"{titles[0]}\" suggest practical, good-value office"
        " supplies bought for regular use.\n"
        f"Step 2: Categories: {'; '.join(dict.fromkeys(cats[:3]))}. Brands: {', '.join(dict.fromkeys(brands[:3]))}.\n"
        f"Step 3: Items: \"{titles[1]}\"; \"{titles[2]}\"; \"{titles[3]}\"."
    )


class ActorCpu:
    """CPU seconds of the encoder actors while a block runs (they exit with the pass, so they are polled).

    Sees the actors of a local Ray started by this process only (with ``ray_address`` set it sees none).

    Counted per process from its start, so a reused idle Ray worker's own start is included (overstates
    the Ray path slightly). With this process's own CPU time it gives a figure that load from other
    processes does not bend the way it bends wall time on a shared machine.
    """

    MARK = "MapBatches(EncodeBatch)"

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.seen, self._stop = every_s, {}, threading.Event()

    def _poll(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            # Only this process's descendants: the local Ray it started (raylet -> workers), not other sessions'.
            for p in me.children(recursive=True):
                try:
                    if self.MARK in " ".join(p.cmdline()):
                        t = p.cpu_times()
                        self.seen[p.pid] = t.user + t.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return float(sum(self.seen.values()))


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn, actors: bool = False) -> tuple[float, float, object]:
    """(wall s, CPU s of this process plus, with ``actors``, of the encoder actors, result)."""
    meter = ActorCpu() if actors else contextlib.nullcontext()
    c0, t0 = _self_cpu(), time.perf_counter()
    with meter:
        out = fn()
    wall, cpu = time.perf_counter() - t0, _self_cpu() - c0
    return wall, cpu + (meter.cpu_s if actors else 0.0), out


def _best_interleaved(fns: list, repeats: int) -> list[tuple[float, float, object]]:
    """Best wall and best CPU time of each (fn, actors), run in turns (A B A B ...) so load hits both alike."""
    best: list[list] = [[float("inf"), float("inf"), None] for _ in fns]
    for _ in range(repeats):
        for i, (fn, actors) in enumerate(fns):
            wall, cpu, out = _timed(fn, actors)
            best[i] = [min(best[i][0], wall), min(best[i][1], cpu), out]
    return [tuple(b) for b in best]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.embed", description=__doc__.splitlines()[2])
    p.add_argument("--rationales", type=int, default=600, help="synthetic rationales to encode")
    p.add_argument("--items", type=int, default=0, help="item texts to encode; 0: all of them")
    p.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the best is kept")
    p.add_argument("--profile", default="dev", help="config profile")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override key.path=value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain-threads", type=int, default=0, help="torch threads of the plain run; 0: all cores")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from sentence_transformers import SentenceTransformer
    from slimrec.config import load_config
    from slimrec.embed.encoder import resolve_encoder
    from slimrec.embed.ray_encode import encode, encode_texts, engine_for, torch_threads
    from slimrec.rayutil import ensure_ray

    cfg = load_config(args.profile, overrides=args.sets)
    ecfg = cfg.embed
    spec = resolve_encoder(ecfg)
    if spec.kind != "st":
        raise SystemExit(f"the baseline is SentenceTransformer; encoder {spec.encoder_id} is not a sentence-transformers dir")
    threads = torch_threads(ecfg)

    items = office_items()
    item_texts = items["item_text"].tolist()[: args.items or None]
    rng = random.Random(args.seed)
    rationales = [synthetic_rationale(items, rng) for _ in range(args.rationales)]
    sets = {"items": item_texts, "rationales": rationales, "items+rationales": item_texts + rationales}

    t0 = time.perf_counter()
    ensure_ray(cfg.ray_address)
    ray_start_s = time.perf_counter() - t0
    plain_threads = args.plain_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(plain_threads)
    t0 = time.perf_counter()
    st = SentenceTransformer(spec.path, device=spec.device, local_files_only=True,
                             model_kwargs={"dtype": getattr(torch, spec.dtype)})
    st.max_seq_length = spec.max_seq_length
    load_s = time.perf_counter() - t0
    tok = st.tokenizer
    mean_tokens = {k: float(np.mean([len(tok(t)["input_ids"]) for t in v[:: max(1, len(v) // 500)]]))
                   for k, v in sets.items()}

    fixed = [_timed(lambda: encode_texts(item_texts[:1], spec, ecfg), actors=True) for _ in range(args.repeats)]
    fixed_cpu = min(f[1] for f in fixed)
    print(f"encoder {spec.encoder_id}; plain: {plain_threads} torch threads; Ray: {ecfg.num_actors} actor(s) x "
          f"{ecfg.actor_num_cpus} CPU x {threads} torch threads, batch {ecfg.batch_size}, encode batch {ecfg.encode_batch_size}, sort {ecfg.sort_by_length}; "
          f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}")
    print(f"ray start {ray_start_s:.1f} s (once per pipeline, not counted); plain model load {load_s:.1f} s "
          f"(not counted); Ray path fixed cost per run (1 text): {min(f[0] for f in fixed):.1f} s wall, "
          f"{fixed_cpu:.1f} CPU-s (subtracted in the last overhead column)")
    print(f"{'texts':<17}{'n':>6}{'tokens':>7} | {'plain/s':>8}{'ray/s':>8}{'ray/plain':>10}{'overhead':>9} | "
          f"{'CPU-ms/text plain':>18}{'ray':>7}{'overhead':>9}{'w/o fixed':>10} |{'max|dv|':>9}")
    rows = []
    fixed_wall = min(f[0] for f in fixed)
    for name, texts in sets.items():
        engine = engine_for(len(texts), ecfg)
        (plain_s, plain_c, plain_v), (ray_s, ray_c, ray_v), (stage_s, stage_c, stage_v) = _best_interleaved(
            [
                (lambda t=texts: st.encode(t, batch_size=ecfg.encode_batch_size, convert_to_numpy=True,
                                           normalize_embeddings=spec.normalize, show_progress_bar=False), False),
                (lambda t=texts: encode_texts(t, spec, ecfg), True),
                (lambda t=texts: encode(t, spec, ecfg)[0], engine == "pool"),
            ],
            args.repeats,
        )
        n = len(texts)
        diff = float(max(np.abs(np.asarray(plain_v) - ray_v).max(), np.abs(np.asarray(plain_v) - stage_v).max()))
        print(f"{name:<17}{n:>6}{mean_tokens[name]:>7.0f} | {n / plain_s:>8.1f}{n / ray_s:>8.1f}"
              f"{plain_s / ray_s:>10.2f}{ray_s / plain_s - 1:>9.1%} | {1000 * plain_c / n:>18.1f}"
              f"{1000 * ray_c / n:>7.1f}{ray_c / plain_c - 1:>9.1%}{(ray_c - fixed_cpu) / plain_c - 1:>10.1%} |"
              f"{diff:>9.1e}")
        print(f"{'':<17}{'':>6}{'':>7} | stage ({engine}): {n / stage_s:.1f} texts/s, overhead {stage_s / plain_s - 1:.1%}")
        case = f"{name} ({n} texts, {mean_tokens[name]:.0f} tokens)"
        best = f"best of {args.repeats} interleaved"
        rows += [
            row(case, f"texts/s, stage ({'actor pool' if engine == 'pool' else 'in process'})", n / stage_s,
                "texts/s", "plain SentenceTransformer", n / plain_s,
                spread=f"{best}; overhead {stage_s / plain_s - 1:.1%}; the stage's choice at "
                       f"embed.pool_min_texts={ecfg.pool_min_texts}"),
            row(case, "texts/s, Ray path", n / ray_s, "texts/s", "plain SentenceTransformer", n / plain_s,
                spread=f"{best}; overhead {ray_s / plain_s - 1:.1%}; fixed cost {fixed_wall:.1f} s of it"),
            row(case, "CPU-ms/text, Ray path", 1000 * ray_c / n, "ms", "plain SentenceTransformer",
                1000 * plain_c / n, spread=f"{best}; without the fixed cost {(ray_c - fixed_cpu) / plain_c - 1:+.1%}"),
        ]
    record("embed", rows, extra={"fixed_wall_s": fixed_wall, "fixed_cpu_s": fixed_cpu, "ray_start_s": ray_start_s,
                                 "plain_threads": plain_threads, "actors": ecfg.num_actors, "threads": threads})
    print(f"load avg after: {os.getloadavg()[0]:.1f} (other processes share these cores: compare within a run)")


if __name__ == "__main__":
    main()

"""python -m bench.embed [--rationales 600] [--repeats 1] [--set embed.num_actors=2 ...]

Sentences per second of the embed stage's Ray Data path
(:func:`slimrec.embed.ray_encode.encode_texts`: actor pool start, model load
in the actor, length sort, batches, collection on the driver) against plain
``SentenceTransformer.encode`` in this process, on the same texts, with the
same model, batch size and torch threads:

* the item texts of ``data/amazon_office_2014`` (title | category path | brand,
  built by the ingest code), short;
* synthetic three-step rationales written from the same catalogue, long
  (about the 137 tokens of the offline teacher's rationales);
* both together, as one stage run encodes them.

Ray is started before timing (the pipeline starts it once for every stage);
the Ray path's time includes its per-run fixed cost, printed separately
(one text through a fresh actor pool). The baseline's model load is printed
beside it but not counted, since a long-lived process would load once.
Prints a table and the ratio Ray / plain; never asserts times. The machine
is shared, so use ``--repeats 3`` (best of each, run in turns) before quoting a figure.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from pathlib import Path

import numpy as np

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


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _best_interleaved(fns: list, repeats: int) -> list[tuple[float, object]]:
    """Best time of each function, run in turns (A B A B ...) so that load from others hits both alike."""
    best: list[tuple[float, object]] = [(float("inf"), None)] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t, out = _timed(fn)
            if t < best[i][0]:
                best[i] = (t, out)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.embed", description=__doc__.splitlines()[2])
    p.add_argument("--rationales", type=int, default=600, help="synthetic rationales to encode")
    p.add_argument("--items", type=int, default=0, help="item texts to encode; 0: all of them")
    p.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the best is kept")
    p.add_argument("--profile", default="dev", help="config profile")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override key.path=value")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from sentence_transformers import SentenceTransformer
    from slimrec.config import load_config
    from slimrec.embed.encoder import resolve_encoder
    from slimrec.embed.ray_encode import encode_texts, torch_threads
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
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    st = SentenceTransformer(spec.path, device=spec.device, local_files_only=True,
                             model_kwargs={"dtype": getattr(torch, spec.dtype)})
    st.max_seq_length = spec.max_seq_length
    load_s = time.perf_counter() - t0
    tok = st.tokenizer
    mean_tokens = {k: float(np.mean([len(tok(t)["input_ids"]) for t in v[:500]])) for k, v in sets.items()}

    fixed_s = min(_timed(lambda: encode_texts(item_texts[:1], spec, ecfg))[0] for _ in range(args.repeats))
    print(f"encoder {spec.encoder_id}; {ecfg.num_actors} actor(s) x {ecfg.actor_num_cpus} CPU, {threads} torch "
          f"threads, batch {ecfg.batch_size}, encode batch {ecfg.encode_batch_size}, sort {ecfg.sort_by_length}; "
          f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}")
    print(f"ray start {ray_start_s:.1f} s (once per pipeline, not counted); plain model load {load_s:.1f} s "
          f"(not counted); Ray path fixed cost per run (1 text) {fixed_s:.1f} s")
    header = f"{'texts':<17}{'n':>6}{'tokens':>8}{'plain/s':>10}{'ray/s':>9}{'ray/plain':>11}{'overhead':>10}{'max|dv|':>10}"
    print(header)
    for name, texts in sets.items():
        (plain_s, plain_v), (ray_s, ray_v) = _best_interleaved(
            [
                lambda t=texts: st.encode(t, batch_size=ecfg.encode_batch_size, convert_to_numpy=True,
                                          normalize_embeddings=spec.normalize, show_progress_bar=False),
                lambda t=texts: encode_texts(t, spec, ecfg),
            ],
            args.repeats,
        )
        n = len(texts)
        diff = float(np.abs(np.asarray(plain_v) - ray_v).max())
        print(f"{name:<17}{n:>6}{mean_tokens[name]:>8.0f}{n / plain_s:>10.1f}{n / ray_s:>9.1f}"
              f"{plain_s / ray_s:>11.2f}{ray_s / plain_s - 1:>10.1%}{diff:>10.1e}")
    print(f"load avg after: {os.getloadavg()[0]:.1f} (other processes share these cores: compare within a run)")


if __name__ == "__main__":
    main()

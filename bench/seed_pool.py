"""A seed pool against a student for every user: the student stage's time and the recommender's NDCG, paired.

    python -m bench.seed_pool --all-lake /tmp/sp/lake_all --pool-lake /tmp/sp/lake_pool

Both lakes hold the same data up to ``distill_student`` (the same student model) and one
``train_recommender`` run each with the same recommender config; ``--all-lake``'s student wrote for every
user (``retrieval.student_users=all``), ``--pool-lake``'s for its seed pool only, the rest retrieved
(``retrieval.student_users=seed_pool``, then ``retrieve_rationales``). One way to make them: run the
pipeline once, copy the lake, delete the copy's ``student_rationales`` and its student rows of
``rationale_embeddings``, then ``slim run --lake COPY --from student_rationales --set
retrieval.student_users=seed_pool``, and ``slim stage train_recommender`` on the first lake with the same
``recommender.*`` settings.

Prints and records (``bench.common.record``):

* the student_rationales stage: users written for, wall seconds and CPU-hours of its last run (stage
  record), pool against all; retrieve_rationales' wall seconds. ``--student-lakes ALL,POOL`` (repeatable) takes the
  student stage's figures from two other lakes instead: copies of the two whose ``student_rationales``
  table was deleted and whose student stage then ran alone, one after the other on a quiet machine under
  the same code (``slim stage student_rationales --lake COPY [--set retrieval.student_users=seed_pool]``),
  so that the time ratio compares like with like;
* per rationale variant of the latest train_recommender run: test NDCG@10 mean over seeds, full ranking
  and sampled-100, pool against all, with the paired difference per user (per-user NDCG@10 averaged over
  seeds, both runs' ``per_user_test.parquet``; the planted experiment's pairing) and its standard error
  std(d)/sqrt(users); the same paired
  on the retrieved users alone and on the written ones;
* the gain of each rationale variant over ``text`` in each run, paired within the run.

Nothing is asserted: what it prints is the measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from slimrec.planted_experiment import paired, per_user_means

from bench.common import record, row

VARIANTS = ("slim", "slim_cooc", "text", "cooc_prior")
PROTOCOLS = ("full", "sampled100")


def _lake(root: str):
    from slimrec.lake import Lake

    return Lake(root)


def stage_figures(lake, stage: str) -> dict:
    """Wall seconds and CPU-hours of the stage's last finished run (its stage record), or {}."""
    rec = lake.stage_record(stage) or {}
    cost = rec.get("cost") or {}
    return {"wall_s": cost.get("run_wall_s") or cost.get("wall_s"), "cpu_hours": cost.get("cpu_hours"),
            "run_id": rec.get("run_id")}


def student_rows(lake) -> dict:
    """Rows of the latest student's rationales by where they came from."""
    models = lake.read_pandas("student_models")
    version = models.sort_values("created_ts").iloc[-1]["model_version"]
    r = lake.read_pandas("student_rationales", columns=["user_id", "model_version", "status", "rationale_source"])
    r = r[r["model_version"] == version]
    src = r["rationale_source"].fillna("student")
    return {"model_version": version, "written": int((src == "student").sum()),
            "written_ok": int(((src == "student") & (r["status"] == "ok")).sum()),
            "retrieved": int((src == "retrieved").sum()),
            "retrieved_ok": int(((src == "retrieved") & (r["status"] == "ok")).sum())}


def run_results(lake) -> tuple[pd.Series, pd.DataFrame, pd.DataFrame]:
    """(latest train_recommender run, its test metrics summary, its per-user test NDCG@10 rows)."""
    from slimrec.results import latest_metrics, latest_run, metrics_summary

    run = latest_run(lake)
    if run is None:
        raise ValueError(f"{lake.root}: no train_recommender run")
    notes = json.loads(run["notes"] or "{}")
    per_user = pd.read_parquet(Path(notes["artifacts"]) / "per_user_test.parquet")
    return run, metrics_summary(latest_metrics(lake, run)), per_user


def pair(x: pd.Series | None, y: pd.Series | None, users: np.ndarray | None = None) -> tuple[float, float, int]:
    """:func:`slimrec.planted_experiment.paired` (mean of x - y over shared users and its SE) on the users in
    ``users`` only (all when None), with how many users it paired; NaN where nothing pairs."""
    if x is None or y is None:
        return float("nan"), float("nan"), 0
    if users is not None:
        x = x[x.index.isin(users)]
    d, se = paired(x, y)
    n = int((x - y).notna().sum())
    return (float("nan"), float("nan"), 0) if d is None else (d, se, n)


def retrieved_rows(lake, run: pd.Series) -> np.ndarray:
    """The run's user rows (sorted user ids) whose student rationale was retrieved."""
    users = np.array(sorted(lake.read_pandas("user_sequences", columns=["user_id"])["user_id"].astype(str)))
    r = lake.read_pandas("student_rationales", columns=["user_id", "run_date", "status", "rationale_source"])
    r = r[r["status"] == "ok"].sort_values("run_date").drop_duplicates("user_id", keep="last")
    got = set(r.loc[r["rationale_source"] == "retrieved", "user_id"].astype(str))
    return np.nonzero(np.isin(users, list(got)))[0]


def _mean(summary: pd.DataFrame, variant: str, protocol: str) -> tuple[float, float, int]:
    s = summary[(summary["variant"] == variant) & (summary["protocol"] == protocol)
                & (summary["backbone"] == "sasrec")]
    if s.empty:
        return float("nan"), float("nan"), 0
    return float(s["ndcg_10_mean"].iloc[0]), float(s["ndcg_10_std"].iloc[0]), int(s["seeds"].iloc[0])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all-lake", required=True, help="lake whose student wrote for every user")
    ap.add_argument("--pool-lake", required=True, help="lake whose student wrote for its seed pool only")
    ap.add_argument("--student-lakes", action="append", default=None,
                    help="ALL,POOL: lakes whose student_rationales stage record gives the stage's time instead; "
                         "repeat for repeated pairs (the median pair by wall ratio is reported, the less favourable of "
                         "two middle ones; every pair in "
                         "the spread)")
    args = ap.parse_args(argv)
    lk_all, lk_pool = _lake(args.all_lake), _lake(args.pool_lake)
    pairs = [(lk_all, lk_pool)] if not args.student_lakes else [tuple(map(_lake, p.split(",")))
                                                                for p in args.student_lakes]
    timed = []
    for t_all, t_pool in pairs:
        a, p = stage_figures(t_all, "student_rationales"), stage_figures(t_pool, "student_rationales")
        a["users"], p["users"] = student_rows(t_all)["written"], student_rows(t_pool)["written"]
        timed.append((a, p))
    timed.sort(key=lambda ap_: ap_[1]["wall_s"] / ap_[0]["wall_s"])
    s_all, s_pool = timed[len(timed) // 2]  # the median pair; of two middle pairs the less favourable one
    wall_spread = (f"{len(timed)} pairs, pool/all wall " + ", ".join(
        f"{p['wall_s']:.1f}/{a['wall_s']:.1f} s = {p['wall_s'] / a['wall_s']:.3f}" for a, p in timed))
    r_pool = stage_figures(lk_pool, "retrieve_rationales")
    n_all, n_pool = student_rows(lk_all), student_rows(lk_pool)
    if n_all["model_version"] != n_pool["model_version"]:
        raise SystemExit(f"the lakes' students differ ({n_all['model_version']} vs {n_pool['model_version']}): "
                         "the comparison needs the same student")
    run_all, sum_all, pu_all = run_results(lk_all)
    run_pool, sum_pool, pu_pool = run_results(lk_pool)
    if int(run_all["n_users"]) != int(run_pool["n_users"]):
        raise SystemExit("the runs evaluate different users: the per-user pairing needs the same user_sequences")
    retrieved = retrieved_rows(lk_pool, run_pool)
    written = np.setdiff1d(np.arange(int(run_pool["n_users"])), retrieved)
    pool_case = f"seed pool {n_pool['written']} users + {n_pool['retrieved']} retrieved"
    all_case = f"student for all {n_all['written']} users"
    rows = [
        row(pool_case, "student users written for", n_pool["written"], "users", all_case, n_all["written"]),
        row(pool_case, "student_rationales wall", s_pool["wall_s"], "s", all_case, s_all["wall_s"],
            spread=wall_spread),
        row(pool_case, "student_rationales CPU", s_pool["cpu_hours"], "CPU-h", all_case, s_all["cpu_hours"]),
        row(pool_case, "retrieve_rationales wall", r_pool["wall_s"] or float("nan"), "s"),
    ]
    paired_out = []
    means = {"pool": per_user_means(pu_pool), "all": per_user_means(pu_all)}  # (backbone, variant, protocol)
    for proto in PROTOCOLS:
        for v in VARIANTS:
            m_p, sd_p, k_p = _mean(sum_pool, v, proto)
            m_a, sd_a, k_a = _mean(sum_all, v, proto)
            x, y = means["pool"].get(("sasrec", v, proto)), means["all"].get(("sasrec", v, proto))
            if x is None or y is None:
                continue
            d, se, n = pair(x, y)
            d_r, se_r, n_r = pair(x, y, retrieved)
            d_w, se_w, n_w = pair(x, y, written)
            rows.append(row(f"{pool_case}, sasrec {v}", f"test NDCG@10 {proto}", m_p, "", all_case, m_a,
                            spread=f"std over {k_p} seeds {sd_p:.4f} (all: {sd_a:.4f}); paired pool - all "
                                   f"{d:+.4f} ± {se:.4f} SE over {n} users; retrieved users {d_r:+.4f} ± {se_r:.4f} "
                                   f"({n_r}); written {d_w:+.4f} ± {se_w:.4f} ({n_w})"))
            paired_out.append({"protocol": proto, "variant": v, "pool": m_p, "all": m_a, "diff": d, "se": se,
                               "n": n, "diff_retrieved": d_r, "se_retrieved": se_r, "n_retrieved": n_r,
                               "diff_written": d_w, "se_written": se_w, "n_written": n_w})
        for v in ("slim", "slim_cooc"):
            for name, m in means.items():
                d, se, n = pair(m.get(("sasrec", v, proto)), m.get(("sasrec", "text", proto)))
                if n == 0:
                    continue
                rows.append(row(f"{name} run, sasrec {v} - text", f"gain NDCG@10 {proto}", d, "",
                                spread=f"± {se:.4f} paired SE over {n} users"))
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(pd.DataFrame(paired_out).to_string(index=False))
    record("seed_pool", rows, extra={"student_lakes": args.student_lakes,
                                     "all": {"lake": args.all_lake, "run_id": run_all["run_id"], **n_all,
                                             "student_stage": s_all, "student_stage_pairs": timed},
                                     "pool": {"lake": args.pool_lake, "run_id": run_pool["run_id"], **n_pool,
                                              "student_stage": s_pool, "retrieve_stage": r_pool},
                                     "paired": paired_out})
    return rows


if __name__ == "__main__":
    main()

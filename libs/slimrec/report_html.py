"""One-file HTML run report: metrics table, charts (embedded PNG), example users.

Built from the lake's tables and the run's stage results; matplotlib draws
the charts off-screen (Agg) and they are embedded as base64, so the page is a
single file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import logging

import pandas as pd

from slimrec.results import (
    BEYOND_COLS,
    BEYOND_LABELS,
    METRIC_COLS,
    beyond_summary,
    latest_beyond_reasons,
    latest_metrics,
    latest_missing,
    latest_paired,
    metrics_summary,
    paired_reference,
    paired_title,
    stage_table,
)

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left}
tr.base td{color:#777;font-style:italic}
.user{border:1px solid #ddd;padding:.6em 1em;margin:1em 0;border-radius:6px}
.rat{white-space:pre-wrap;font-size:12px;background:#fafafa;padding:.5em}
img{max-width:100%}
.leak{background:#fdd;color:#900;border:2px solid #b00;padding:.6em 1em;font-weight:bold}
"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def _metric_chart(summary: pd.DataFrame, metric: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = [p for p in ("full", "sampled100") if p in set(summary["protocol"])]
    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 3.6), squeeze=False)
    for ax, proto in zip(axes[0], protocols, strict=True):
        s = summary[summary["protocol"] == proto].sort_values(f"{metric}_mean")
        labels = [f"{b}/{v}" for b, v in zip(s["backbone"], s["variant"], strict=True)]
        ax.barh(labels, s[f"{metric}_mean"], xerr=s[f"{metric}_std"], color="#4a7fb5")
        ax.set_title(f"{metric.upper().replace('_', '@')} — {proto}")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return _png(fig)


def _accuracy_coverage_chart(beyond: pd.DataFrame) -> str:
    """Test NDCG@10 against catalogue coverage@10 (full ranking), one labelled point per (backbone, variant),
    error bars = std over seeds: a variant that gains accuracy by narrowing to best-sellers moves left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = beyond[beyond["coverage_10_mean"].notna()]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in s.itertuples(index=False):
        base = r.variant.split("@")[0] in ("random", "popular")
        ax.errorbar(r.coverage_10_mean, r.ndcg_10_mean, xerr=r.coverage_10_std, yerr=r.ndcg_10_std, fmt="o",
                    capsize=3, color="#999" if base else "#4a7fb5")
        ax.annotate(r.variant if r.backbone == "none" else f"{r.backbone}/{r.variant}",
                    (r.coverage_10_mean, r.ndcg_10_mean), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("catalogue coverage@10 (share of items in some user's top 10)")
    ax.set_ylabel("NDCG@10")
    ax.set_title("accuracy against coverage — test, full ranking")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _beyond_html(beyond: pd.DataFrame, reasons: dict[str, list[str]]) -> str:
    if beyond.empty:
        return "<p>No beyond-accuracy figures: the run predates them or measured none.</p>"
    cols = ["ndcg_10", *BEYOND_COLS]
    labels = {"ndcg_10": "NDCG@10", **BEYOND_LABELS}
    head = "".join(f"<th>{html.escape(labels[c])}</th>" for c in cols)
    rows = []
    for r in beyond.itertuples(index=False):
        d = r._asdict()
        cls = ' class="base"' if r.variant.split("@")[0] in ("random", "popular") else ""
        digits = {"popularity_pct_10": 2}
        cells = "".join(
            "<td>-</td>" if d[c + "_mean"] != d[c + "_mean"]
            else f"<td>{d[c + '_mean']:.{digits.get(c, 4)}f} ± {d[c + '_std']:.{digits.get(c, 4)}f}</td>"
            for c in cols)
        rows.append(f"<tr{cls}><td class=l>{r.backbone}</td><td class=l>{html.escape(r.variant)}</td>"
                    f"<td>{r.seeds}</td>{cells}</tr>")
    note = ("<p id='beyond-missing'>Not measured: " + "; ".join(
        f"<b>{html.escape(k)}</b> ({html.escape('; '.join(v))})" for k, v in reasons.items()) + ".</p>"
            if reasons else "")
    return (f'<table id="beyond"><tr><th class=l>backbone</th><th class=l>variant</th><th>seeds</th>{head}</tr>'
            f"{''.join(rows)}</table>{note}")


def _stage_chart(stages: pd.DataFrame) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.2))
    for ax, col, title in zip(axes, ["seconds", "rows_out", "cost_usd"], ["time (s)", "rows out", "cost (USD)"], strict=True):
        ax.barh(stages["stage"], stages[col], color="#6a9f58")
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return _png(fig)


def _length_chart(lengths: dict[str, pd.Series]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, s in lengths.items():
        if len(s):
            ax.hist(s, bins=40, alpha=0.6, label=f"{name} (n={len(s)}, median {int(s.median())})")
    ax.set_xlabel("rationale length (words)")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def _metrics_html(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "<p>No metrics: train_recommender has not run.</p>"
    head = "".join(f"<th>{c.replace('_', '@').upper()}</th>" for c in METRIC_COLS)
    rows = []
    for r in summary.itertuples(index=False):
        d = r._asdict()
        cls = ' class="base"' if r.variant in ("random", "popular") else ""
        cells = "".join(f"<td>{d[c + '_mean']:.4f} ± {d[c + '_std']:.4f}</td>" for c in METRIC_COLS)
        rows.append(f"<tr{cls}><td class=l>{r.protocol}</td><td class=l>{r.backbone}</td>"
                    f"<td class=l>{html.escape(r.variant)}</td><td>{r.seeds}</td>{cells}</tr>")
    return (f'<table id="metrics"><tr><th class=l>protocol</th><th class=l>backbone</th><th class=l>variant</th>'
            f"<th>seeds</th>{head}</tr>{''.join(rows)}</table>")


def _paired_html(paired: pd.DataFrame) -> str:
    if paired.empty:
        return "<p>No paired comparison (no model or baseline without an LLM, or per-user results missing).</p>"
    rows = []
    for r in paired.itertuples(index=False):
        rows.append(f"<tr><td class=l>{r.protocol}</td><td class=l>{r.backbone}</td>"
                    f"<td class=l>{html.escape(r.variant)}</td><td>{r.n_users:,}</td><td>{r.n_seeds}</td>"
                    f"<td>{r.variant_ndcg_10:.4f}</td><td>{r.reference_ndcg_10:.4f}</td><td>{r.mean_diff:+.4f}</td>"
                    f"<td>{r.se:.4f}</td><td>{r.users_better:,} / {r.users_worse:,}</td></tr>")
    return ('<table id="paired"><tr><th class=l>protocol</th><th class=l>backbone</th><th class=l>variant</th>'
            f"<th>users</th><th>seeds</th><th>NDCG@10</th><th>{html.escape(paired_reference(paired))}</th><th>diff</th>"
            "<th>paired SE</th>"
            f"<th>better / worse users</th></tr>{''.join(rows)}</table>")


def _latest(lake, table: str, columns: list[str]) -> pd.DataFrame:
    return lake.read_pandas(table, columns=columns) if lake.exists(table) else pd.DataFrame(columns=columns)


def _examples(lake, n: int) -> str:
    if not lake.exists("user_sequences"):
        return "<p>No users yet.</p>"
    teacher = _latest(lake, "teacher_rationales", ["user_id", "rationale", "status"])
    teacher = teacher[teacher["status"] == "ok"].drop_duplicates("user_id")
    student = _latest(lake, "student_rationales", ["user_id", "rationale", "status", "run_date"])
    student = student[student["status"] == "ok"].sort_values("run_date").drop_duplicates("user_id", keep="last")
    recs = _latest(lake, "recommendations", ["user_id", "item_ids", "run_date"])
    recs = recs.sort_values("run_date").drop_duplicates("user_id", keep="last")
    seqs = lake.read_pandas("user_sequences", columns=["user_id", "history", "test_target"])
    titles = dict(lake.read_pandas("items", columns=["item_id", "title"]).values.tolist())
    users = list(teacher["user_id"])[:n] or list(seqs["user_id"])[:n]
    t, s, r = (dict(zip(df["user_id"], df[c], strict=True)) for df, c in
               ((teacher, "rationale"), (student, "rationale"), (recs, "item_ids")))
    seq = seqs.set_index("user_id")
    out = []
    for u in users:
        hist = list(seq.loc[u, "history"])[-5:]
        target = seq.loc[u, "test_target"]
        top = list(r.get(u, []))[:10]
        li = "".join(f"<li>{'<b>' if i == target else ''}{html.escape(str(titles.get(i, i)))}"
                     f"{' (test target)</b>' if i == target else ''}</li>" for i in top)
        out.append(
            f'<div class="user"><h3>user {html.escape(str(u))}</h3>'
            f"<p><b>last history items:</b> {'; '.join(html.escape(str(titles.get(i, i))) for i in hist)}</p>"
            f"<p><b>test target:</b> {html.escape(str(titles.get(target, target)))}</p>"
            f'<p><b>teacher rationale</b></p><div class="rat">{html.escape(t.get(u, "(none)"))}</div>'
            f'<p><b>student rationale</b></p><div class="rat">{html.escape(s.get(u, "(none)"))}</div>'
            f"<p><b>top-10 recommendations</b></p><ol>{li or '<li>(none)</li>'}</ol></div>"
        )
    return "".join(out)


def _cell(x, fmt: str) -> str:
    return "-" if x is None or x != x else format(x, fmt)


def _cost_html(costs: pd.DataFrame, variants: pd.DataFrame, prices) -> str:
    """The run's cost per stage and each LLM variant's gain over text per $1,000 and per hour."""
    from slimrec.cost import COST_NOTE

    out = [f"<h2>Cost per stage (this run)</h2><p>Compute priced at {prices.cpu_hour_usd:g} USD per CPU-hour and "
           f"{prices.gpu_hour_usd:g} per GPU-hour (<code>cost.*</code>); CPU-hours are the measured CPU time of the "
           "driver and its process tree (Spark JVM, local Ray), GPU-hours the GPUs a stage reserved times its wall "
           "time (an allocation, not a utilisation).</p>"]
    if costs.empty:
        out.append("<p>No stage ran.</p>")
    else:
        rows = "".join(
            f"<tr><td class=l>{html.escape(r.stage)}</td><td class=l>{r.status}</td><td>{_cell(r.calls, ',.0f')}</td>"
            f"<td>{_cell(r.input_tokens, ',.0f')}</td><td>{_cell(r.output_tokens, ',.0f')}</td>"
            f"<td>{_cell(r.texts, ',.0f')}</td><td>{r.wall_s:.1f}</td><td>{r.cpu_hours:.4f}</td>"
            f"<td>{r.gpu_hours:.4f}</td><td>{_cell(r.api_usd, '.4f')}</td><td>{r.compute_usd:.4f}</td>"
            f"<td>{r.usd:.4f}</td><td class=l>{html.escape(r.note)}</td></tr>" for r in costs.itertuples(index=False))
        out.append("<table id='cost'><tr><th class=l>stage</th><th class=l>status</th><th>calls</th><th>input tokens</th>"
                   "<th>output tokens</th><th>texts</th><th>wall s</th><th>CPU-hours</th><th>GPU-hours</th>"
                   f"<th>API $</th><th>compute $</th><th>total $</th><th class=l>note</th></tr>{rows}</table>")
    out.append(f"<h2>Gain over text per $1,000 and per hour</h2><p>{html.escape(COST_NOTE)}</p>")
    if variants.empty:
        out.append("<p>No LLM variant in the latest train_recommender run.</p>")
        return "".join(out)
    rows = "".join(
        f"<tr><td class=l>{r.backbone}</td><td class=l>{html.escape(r.variant)}</td><td>{r.ndcg_10:.4f}</td>"
        f"<td>{_cell(r.text_ndcg_10, '.4f')}</td><td>{_cell(r.gain, '+.4f')}</td><td>{r.usd:.4f}</td>"
        f"<td>{r.hours:.4f} {r.hour_unit}s</td><td>{_cell(r.gain_per_1k_usd, '+.4f')}</td>"
        f"<td>{_cell(r.gain_per_hour, '+.4f')} per {r.hour_unit}</td><td class=l>{html.escape(r.charged)}"
        f"{'; ' + html.escape(r.note) if r.note else ''}</td></tr>" for r in variants.itertuples(index=False))
    out.append("<table id='variant-cost'><tr><th class=l>backbone</th><th class=l>variant</th><th>NDCG@10</th>"
               "<th>text</th><th>gain</th><th>$ charged</th><th>hours charged</th><th>gain per $1,000</th>"
               f"<th>gain per hour</th><th class=l>charged stages</th></tr>{rows}</table>")
    return "".join(out)


def render_html(lake, results, run_id: str, run_date, n_examples: int = 3, cfg=None) -> str:
    """The whole report page as a string (``cfg``: the run's PipelineConfig, for the cost table's prices)."""
    from slimrec.config import PipelineConfig
    from slimrec.cost import run_cost_tables

    cfg = cfg or PipelineConfig()
    stages = stage_table(results)
    metrics = latest_metrics(lake)
    summary = metrics_summary(metrics)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>slimrec run {run_id}</title>"
             f"<style>{_CSS}</style></head><body><h1>slimrec run {html.escape(run_id)} ({run_date})</h1>"]
    parts.append("<h2>Metrics (test target, mean ± std over seeds)</h2>"
                 "<p>Full ranking ranks the target among all items except the user's history (the validation item "
                 "included); sampled100 ranks it among 100 random items the user never had. Random and popular "
                 "rows are the baselines.</p>")
    parts.append(_metrics_html(summary))
    beyond = beyond_summary(summary)
    parts.append("<h2>Beyond accuracy (test users, full ranking, mean ± std over seeds)</h2>"
                 "<p>From each test user's top-K list over the same candidates as full ranking. Coverage: share "
                 "of the catalogue in at least one list. Gini: inequality of the catalogue's exposure in the "
                 "top 10 (items never recommended count as 0; 0 = even). Popularity pct: mean percentile of "
                 "the recommended items' training counts (about 50 for random, near 100 for best-sellers). "
                 "Novelty: mean -log2 of the items' share of training interactions (bits). ILD: mean "
                 "pairwise cosine distance of item text vectors within a top-10 list.</p>"
                 + _beyond_html(beyond, latest_beyond_reasons(lake)))
    if not beyond.empty and beyond["coverage_10_mean"].notna().any():
        parts.append('<div id="accuracy-coverage">' + _accuracy_coverage_chart(beyond) + "</div>")
    missing = latest_missing(lake)
    if missing:
        parts.append("<p id='missing'>Configured but not run: " + "; ".join(
            f"<b>{html.escape(v)}</b> ({html.escape(why)})" for v, why in missing.items()) + ".</p>")
    paired = latest_paired(lake)
    parts.append(f"<h2>{html.escape(paired_title(paired))}</h2><p>Test NDCG@10 per user, averaged over seeds, "
                 "paired with that reference on the same users; SE = std(diff) / sqrt(users). The reference is "
                 "chosen on the validation target among the models and baselines that need no LLM.</p>"
                 + _paired_html(paired))
    if not summary.empty:
        parts.append('<h2>NDCG@10 and HR@10 by variant</h2><div id="charts">')
        parts.append(_metric_chart(summary, "ndcg_10") + _metric_chart(summary, "hr_10") + "</div>")
    if not stages.empty:
        st = "".join(f"<tr><td class=l>{r.stage}</td><td class=l>{r.status}</td><td>{r.seconds:.1f}</td>"
                     f"<td>{r.rows_in:,}</td><td>{r.rows_out:,}</td><td>{r.cost_usd:.4f}</td></tr>"
                     for r in stages.itertuples(index=False))
        parts.append("<h2>Stages</h2><table id='stages'><tr><th class=l>stage</th><th class=l>status</th>"
                     f"<th>seconds</th><th>rows in</th><th>rows out</th><th>cost USD</th></tr>{st}</table>")
        parts.append(_stage_chart(stages))
    parts.append(_cost_html(*run_cost_tables(lake, results, cfg, summary), cfg.cost))
    lengths = {}
    for name, table in (("teacher", "teacher_rationales"), ("student", "student_rationales")):
        df = _latest(lake, table, ["rationale", "status"])
        ok = df[df["status"] == "ok"]["rationale"].dropna()
        lengths[name] = ok.str.split().str.len()
    if any(len(s) for s in lengths.values()):
        parts.append("<h2>Rationale lengths</h2>" + _length_chart(lengths))
    parts.append("<h2>Example users</h2>" + _examples(lake, n_examples))
    parts.append(_latest_experiment(lake))
    parts.append("</body></html>")
    return "".join(parts)


def _curve_chart(rows: pd.DataFrame) -> str:
    """NDCG@10 against precision, one line per variant (error bars: std over seeds), one panel per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = rows[(rows.split == "test") & (rows.metric == "ndcg_10")]
    protocols = [p for p in ("full", "sampled100") if p in set(t["protocol"])]
    fig, axes = plt.subplots(1, max(1, len(protocols)), figsize=(6.5 * max(1, len(protocols)), 4), squeeze=False)
    for ax, proto in zip(axes[0], protocols, strict=False):
        s = t[t.protocol == proto]
        for (b, v), g in s.groupby(["backbone", "variant"], sort=False):
            g = g.sort_values("precision")
            ax.errorbar(g["precision"], g["mean"], yerr=g["std"], marker="o", capsize=3,
                        label=v if b == "none" else f"{b}/{v}")
        ax.set_title(f"test NDCG@10, {proto} (LEAKAGE BY DESIGN)", color="#b00")
        ax.set_xlabel("planted precision p")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    return _png(fig)


def _latest_experiment(lake) -> str:
    """The lake's latest planted-signal curve (``slim experiment planted``), flagged as leakage; "" if none."""
    from slimrec.teacher.planted import LEAKAGE_NOTE

    if not lake.exists("experiments"):
        return ""
    rows = lake.read_pandas("experiments")
    if rows.empty:
        return ""
    last = rows.sort_values("run_id")["experiment_id"].iloc[-1]
    rows = rows[rows.experiment_id == last]
    return (f"<h2>Rationale-channel experiment {html.escape(last)} (planted-signal teacher)</h2>"
            f"<div class='leak'>{html.escape(LEAKAGE_NOTE)}</div>" + _curve_chart(rows))


def planted_page(rows: pd.DataFrame, checks: list[dict], head_md: str, curve_txt: str, checks_txt: str) -> str:
    """The planted-signal experiment's own page: red leakage banner, the curve plot, table and checks."""
    from slimrec.teacher.planted import LEAKAGE_NOTE

    chart = _curve_chart(rows) if len(rows) else "<p>(no results)</p>"
    title = html.escape(head_md.splitlines()[0].lstrip("# "))
    rest = html.escape("\n".join(head_md.splitlines()[3:]))
    n_ok = sum(c["ok"] for c in checks)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}"
        "</style></head>"
        f"<body><h1>{title}</h1><div class='leak'>{html.escape(LEAKAGE_NOTE)}</div><pre>{rest}</pre>{chart}"
        f"<h2>Curve</h2><pre>{html.escape(curve_txt)}</pre>"
        f"<h2>Checks ({n_ok} of {len(checks)} hold)</h2><pre>{html.escape(checks_txt)}</pre></body></html>"
    )

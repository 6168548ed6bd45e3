"""A tiny, valid lake for the quality tests: every table, consistent with each other.

``world()`` returns ``{table: list of row dicts}``; a test changes a copy (plants
one defect), writes it with :func:`write_world` and validates one table.
"""

from __future__ import annotations

import copy
import hashlib
from datetime import UTC, date, datetime

import pytest

RUN_DATE = date(2024, 1, 15)
STALE = date(2024, 1, 14)
TS = datetime(2024, 1, 15, 8, 0, tzinfo=UTC)


def sha1(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def _rationale(user: str, item_title: str) -> dict:
    s1, s2, s3 = f"{user} likes pens.", "Category Office > Pens, brand Acme.", f'Try "{item_title}".'
    return dict(
        rationale=f"Step 1: {s1} Step 2: {s2} Step 3: {s3}",
        step1=s1,
        step2=s2,
        step3=s3,
        status="ok",
        error=None,
    )


def world() -> dict[str, list[dict]]:
    items = [
        dict(item_id=f"i{k}", title=f"Pen {k}", brand="Acme", categories=["Office", "Pens"], description=None,
             item_text=f"Pen {k} | Office > Pens | Acme", text_hash=sha1(f"Pen {k} | Office > Pens | Acme"))
        for k in range(1, 6)
    ]
    seqs = {"u1": ["i1", "i2", "i3"], "u2": ["i2", "i3", "i4", "i1"]}
    interactions = [
        dict(user_id=u, item_id=i, event_ts=datetime(2024, 1, 1 + n, tzinfo=UTC), event_seq=n,
             ts_derived=False, source_file="events.csv")
        for u, ids in seqs.items()
        for n, i in enumerate(ids)
    ]
    user_sequences = [
        dict(user_id=u, item_ids=ids, history=ids[:-2], valid_target=ids[-2], test_target=ids[-1],
             seq_len=len(ids), last_event_ts=TS, seq_hash=sha1("\x1f".join(ids)))
        for u, ids in seqs.items()
    ]
    prompts = [
        dict(user_id=u, teacher_prompt=f"History of {u}: " + ", ".join(ids[:-2]), student_prompt=f"{u}: {ids[0]}",
             prompt_version="v1", prompt_hash=sha1(f"v1\x1f{u}"), history_len=len(ids) - 2,
             n_prompt_items=len(ids) - 2, prompt_item_ids=ids[:-2], seq_hash=sha1("\x1f".join(ids)))
        for u, ids in seqs.items()
    ]
    teacher = [
        dict(prompt_hash=sha1(f"p{k}"), teacher_model="offline-v1", user_id=f"u{k}", prompt_version="v1",
             **_rationale(f"u{k}", "Pen 1"), grounded_item_ids=["i1"], attempts=1, input_tokens=100,
             output_tokens=50, cost_usd=0.0, latency_ms=3.5, finish_reason="stop", answered_ts=TS)
        for k in range(1, 5)
    ]
    teacher_batches = [
        dict(submission_id=f"s{k}", teacher_model="gpt-4o-mini", base_url="https://api.openai.com/v1", round=k,
             status=status, batch_id=f"batch_{k}", input_file_id=f"file-in{k}", output_file_id=f"file-out{k}",
             error_file_id=None, custom_ids=[sha1(f"p{k}")], request_count=1, completed_count=1, failed_count=0,
             error=None, created_ts=TS, updated_ts=TS)
        for k, status in ((0, "collected"), (1, "in_progress"))
    ]
    student_models = [
        dict(model_version="m1", base_model="tiny-llama", adapter_path="/models/m1", lora_config="{}",
             train_rows=10, heldout_rows=2, train_loss=1.5, val_loss=1.7, heldout_rouge_l_student=0.4,
             heldout_rouge_l_base=0.1, metrics="{}", created_ts=TS)
    ]
    student = [
        dict(user_id=u, model_version="m1", prompt_hash=sha1(f"v1\x1f{u}"), **_rationale(u, "Pen 2"),
             grounded_item_ids=["i2"], output_tokens=40, latency_ms=12.0)
        for u in ("u1", "u2")
    ]
    vec = [0.1, 0.2, 0.3, 0.4]
    rationale_embeddings = [
        dict(user_id=u, source="student", model_version="m1", encoder="enc", text_hash=sha1(u), embedding=vec, dim=4)
        for u in ("u1", "u2")
    ]
    item_embeddings = [
        dict(item_id=f"i{k}", encoder="enc", text_hash=sha1(f"i{k}"), embedding=vec, dim=4) for k in range(1, 4)
    ]
    runs = [
        dict(run_id="r1", dataset="tiny", config="{}", best_backbone="sasrec", best_variant="slim", n_users=2,
             n_items=5, notes="{}", started_ts=datetime(2024, 1, 15, 7, tzinfo=UTC), finished_ts=TS)
    ]
    # beyond-accuracy figures on the full-ranking rows only (null on the others, as the stage writes them)
    beyond = dict(coverage_10=0.3, coverage_20=0.45, gini_10=0.6, popularity_pct_10=80.0, novelty_10=5.5, ild_10=0.7)
    metrics = [
        dict(run_id="r1", dataset="tiny", backbone="sasrec", variant=v, protocol=p, split="test", seed=0,
             hr_10=0.5, hr_20=0.75, ndcg_10=0.3, ndcg_20=0.35, mrr=0.25, n_users=2, **(beyond if p == "full" else {}))
        for v in ("backbone", "slim")
        for p in ("full", "sampled100")
    ]
    experiments = [
        dict(experiment_id="planted-1", kind="planted", dataset="tiny", precision=p, run_id="r1",
             teacher_model=f"offline-v1+planted-p{p:g}", backbone="sasrec", variant="teacher", protocol="full",
             split="test", metric="ndcg_10", mean=0.1 + p / 2, std=0.01, n_seeds=3, n_users=2,
             reference="sasrec/cooc_prior", diff_vs_text=p / 4, se_vs_text=0.01, diff_vs_reference=p / 5,
             se_vs_reference=0.02, diff_vs_p0=p / 3, se_vs_p0=0.01, diff_vs_prev=None, se_vs_prev=None,
             leakage="LEAKAGE BY DESIGN")
        for p in (0.0, 0.5)
    ]
    recommendations = [
        dict(user_id=u, item_ids=["i5", "i4"], scores=[0.9, 0.5], run_id="r1", backbone="sasrec", variant="slim")
        for u in ("u1", "u2")
    ]
    quarantine = [
        dict(stage="ingest", source="events.csv", source_row=7, reason="empty user id", payload="{}"),
        dict(stage="build_sequences", source="interactions", source_row=None, reason="too short", payload=None),
    ]
    dq_results = [
        dict(validation_id="x:items@0", table_name="items", table_version=0, suite="items.v1", suite_success=True,
             expectation=e, column_name="item_id", success=True, observed="0 unexpected", unexpected_count=0,
             details="{}", validated_ts=TS)
        for e in ("expect_column_values_to_not_be_null", "expect_column_values_to_be_unique")
    ]
    raw_interactions = [
        dict(source_file="events.csv", source_row=n, user_raw="u1", item_raw=f"i{n + 1}", ts_raw=str(n), position=n)
        for n in range(3)
    ]
    raw_items = [
        dict(source_file="items.json", source_row=n, item_raw=f"i{n + 1}", payload="{}") for n in range(3)
    ]
    return copy.deepcopy(
        dict(
            raw_interactions=raw_interactions,
            raw_items=raw_items,
            items=items,
            interactions=interactions,
            user_sequences=user_sequences,
            prompts=prompts,
            teacher_rationales=teacher,
            teacher_batches=teacher_batches,
            student_models=student_models,
            student_rationales=student,
            rationale_embeddings=rationale_embeddings,
            item_embeddings=item_embeddings,
            recommender_runs=runs,
            metrics=metrics,
            experiments=experiments,
            recommendations=recommendations,
            quarantine=quarantine,
            dq_results=dq_results,
        )
    )


# Tables each table's suite reads (references), written before it.
REFS = {
    "interactions": ["items"],
    "user_sequences": ["items"],
    "prompts": ["items", "user_sequences"],
    "teacher_rationales": ["items"],
    "student_rationales": ["items", "student_models"],
    "item_embeddings": ["items"],
    "metrics": ["recommender_runs"],
    "experiments": ["recommender_runs"],
    "recommendations": ["items", "recommender_runs"],
}


def commit_info(stage: str = "test", run_date: date = RUN_DATE, **inputs):
    from slimrec.lake import CommitInfo

    return CommitInfo(stage=stage, run_date=run_date, run_id="run1", input_versions=inputs)


def _arrow(table: str, rows: list[dict], run_date: date, nullable: bool = False):
    import pyarrow as pa
    from slimrec.schemas.tables import spec

    s = spec(table)
    if not rows:
        return s.arrow_schema().empty_table().drop_columns(["run_date", "input_versions"])
    if any("run_date" in r for r in rows):  # a planted stale date: the other rows keep the run's date
        rows = [{"run_date": run_date, **r} for r in rows]
    fields = [f.with_nullable(True) for f in s.arrow_schema() if any(f.name in r for r in rows)]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def write_table(lake, table: str, rows: list[dict], mode: str = "append", run_date: date = RUN_DATE):
    return lake.write_arrow(table, _arrow(table, rows, run_date), mode, commit_info(run_date=run_date))


def write_unchecked(lake, table: str, rows: list[dict], run_date: date = RUN_DATE) -> int:
    """Append rows with every column nullable, as a writer outside Lake could (delta-spark, other tools).

    Both Lake write paths cast to the NOT NULL Arrow schema and refuse a null key;
    this is the only way to plant one.
    """
    import json

    import pyarrow as pa
    from deltalake import write_deltalake
    from slimrec.schemas.tables import spec

    s = spec(table)
    data = _arrow(table, rows, run_date)
    n = len(data)
    data = data.append_column("run_date", pa.array([run_date] * n, pa.date32()))
    data = data.append_column("input_versions", pa.array([json.dumps({})] * n, pa.string()))
    schema = pa.schema([f.with_nullable(True) for f in s.arrow_schema()])
    write_deltalake(lake.path(table), data.select(s.column_names).cast(schema), mode="append",
                    partition_by=list(s.partition_by) or None, commit_properties=commit_info(run_date=run_date).properties())
    return lake.version(table)


def write_world(lake, w: dict[str, list[dict]], table: str, unchecked: bool = False) -> int:
    """Write ``table`` and the tables its suite references; returns the version of ``table``."""
    for ref in REFS.get(table, []):
        write_table(lake, ref, w[ref])
    return (write_unchecked if unchecked else write_table)(lake, table, w[table])


@pytest.fixture
def qcfg():
    from slimrec.quality.config import QualityConfig

    return QualityConfig(embedding_dims={"enc": 4})

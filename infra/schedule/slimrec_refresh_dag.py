"""Airflow DAG: slimrec's daily rationale refresh, then a check of what it wrote.

Drop this file into the DAGs folder of an Airflow whose workers have the slimrec image's environment
(``slim`` on PATH, the lake mounted). For the logical date D (the day whose events are processed):

1. ``slim refresh --run-date D --events <events_dir>/events-D.csv``: merges the day's events and
   redoes only what they change (sequences, prompts, teacher calls within budget, student
   rationales, embeddings), then rescores the affected users; every stage has its quality gate.
2. ``slim validate recommendations``: exits 1 when the suite fails, which fails the DAG run.

``max_active_runs=1`` keeps runs from overlapping (the lake lock would make a second one exit 2).
Settings come from Airflow Variables with these defaults: ``slimrec_lake`` (/lake),
``slimrec_profile`` (prod), ``slimrec_events_dir`` (/lake/incoming), ``slimrec_report_dir``
(/lake/reports). The teacher's key is the worker's OPENAI_API_KEY (an Airflow connection or a
Kubernetes secret), never a DAG parameter. Written for Airflow 2.7+ and 3.x; not imported with a
real Airflow in this repository (apache-airflow is not installed here).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.7+
    from airflow import DAG
    from airflow.operators.bash import BashOperator

DAG_ID = "slimrec_daily_refresh"
SCHEDULE = "15 2 * * *"  # 02:15 UTC, after the day's events have landed

# Jinja: Airflow renders these at run time; `ds` is the logical date (YYYY-MM-DD).
SETTINGS = (
    "{% set lake = var.value.get('slimrec_lake', '/lake') %}"
    "{% set profile = var.value.get('slimrec_profile', 'prod') %}"
    "{% set events = var.value.get('slimrec_events_dir', '/lake/incoming') %}"
    "{% set reports = var.value.get('slimrec_report_dir', '/lake/reports') %}"
)
REFRESH = (
    SETTINGS + "slim refresh --lake {{ lake }} --profile {{ profile }} --run-date {{ ds }} "
    "--events {{ events }}/events-{{ ds }}.csv --report-dir {{ reports }}/{{ ds }}"
)
VALIDATE = SETTINGS + "slim validate recommendations --lake {{ lake }} --profile {{ profile }}"

with DAG(
    dag_id=DAG_ID,
    description="slimrec: merge the day's events, refresh rationales and embeddings, rescore changed users",
    schedule=SCHEDULE,
    start_date=datetime(2024, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=15), "execution_timeout": timedelta(hours=6)},
    tags=["slimrec"],
) as dag:
    refresh = BashOperator(task_id="slim_refresh", bash_command=REFRESH)
    validate = BashOperator(task_id="validate_recommendations", bash_command=VALIDATE)
    refresh >> validate

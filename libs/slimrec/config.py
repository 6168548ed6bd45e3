"""Typed, frozen configuration.

One pydantic model per stage, gathered in :class:`PipelineConfig`. A config is
built from a named profile (``libs/slimrec/profiles/<name>.yaml``), then an
optional user YAML file, then ``--set key.path=value`` overrides (values
parsed as YAML, checked against the field types). Unknown keys are errors.

Secrets never live here: the teacher names the *environment variable* that
holds its API key (``teacher.api_key_env``).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slimrec.embed.config import EmbedConfig
from slimrec.quality.config import QualityConfig
from slimrec.recommender.config import RecommenderConfig
from slimrec.student.config import StudentConfig
from slimrec.teacher.config import TeacherConfig

# importlib.resources, not __file__: the package may be imported from a zip (spark-submit --py-files)
PROFILES = resources.files("slimrec") / "profiles"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SparkConfig(_Frozen):
    master: str = Field("local[2]", description="Spark master URL: local[N], spark://host:port, k8s://..., yarn")
    app_name: str = Field("slimrec", description="Spark application name")
    shuffle_partitions: int | None = Field(
        None, description="spark.sql.shuffle.partitions; None sizes it from the input (about 1 per 250k rows, >= 2)"
    )
    driver_memory: str = Field("2g", description="spark.driver.memory (only honoured when Spark starts here)")
    driver_java_options: str = Field(
        "",
        description="spark.driver.extraJavaOptions for a local[N] master started here (a cluster's own "
        "settings are left alone), e.g. -XX:+UseParallelGC. In local mode the driver JVM runs the tasks too. "
        "Empty: the JVM's defaults (bench.foundation showed no gain from ParallelGC beyond its noise)",
    )
    delta_engine: Literal["delta-rs", "delta-spark"] = Field(
        "delta-rs",
        description="delta-rs: executors write Parquet, the driver commits with deltalake (works anywhere). "
        "delta-spark: native io.delta writer; needs the Delta jars on the classpath (cluster images)",
    )
    extra_conf: dict[str, str] = Field(default_factory=dict, description="extra spark.* settings passed verbatim")


class LakeConfig(_Frozen):
    root: str = Field("lake", description="folder (or object-store URI) that holds one Delta table per folder")
    target_file_rows: int = Field(500_000, description="rows per Parquet file written by an executor, at most")
    storage_options: dict[str, str] = Field(default_factory=dict, description=(
        "object-store settings that are not secret, for delta-rs and pyarrow alike (AWS_ENDPOINT_URL, AWS_REGION, "
        "AWS_ALLOW_HTTP...); credentials come from the environment (AWS_ACCESS_KEY_ID...) and a secret-looking key "
        "here is refused"))
    s3_commit: Literal["conditional_put", "unsafe_rename"] = Field("conditional_put", description=(
        "how commits to an S3 lake stay safe with concurrent writers: conditional_put (If-None-Match: AWS S3, MinIO, "
        "R2, SeaweedFS) or unsafe_rename (servers without conditional writes; two writers at once can lose a commit)"))
    local_dir: str | None = Field(None, description=(
        "for an object-store lake: the folder for what must be a path (student models, checkpoints, run artifacts, "
        "the default MLflow store); None: .slimrec-local/<bucket>/<prefix> under the current directory. A folder "
        "every node shares on a multi-node cluster"))
    spark_reader: Literal["auto", "parquet", "datasource"] = Field("auto", description=(
        "how Spark reads a table's files: parquet (Spark's reader: local disk, HDFS, or a scheme the cluster's "
        "Hadoop serves), datasource (pyarrow on the executors: any object store, no connector jars); auto: parquet "
        "for local and HDFS lakes, datasource otherwise"))

    @model_validator(mode="after")
    def _no_secrets(self):
        from slimrec.storage import check_storage_options

        check_storage_options(self.storage_options)
        return self


class IngestConfig(_Frozen):
    format: Literal["auto", "lcrec", "amazon", "events"] = Field(
        "auto", description="source format; auto detects from the file names"
    )
    max_text_chars: int = Field(2000, description="longer title/description text is cut to this many characters")
    max_id_chars: int = Field(128, description="ids longer than this are quarantined")
    order_base_ts: str = Field(
        "2014-01-01T00:00:00+00:00",
        description="for sources with order but no timestamps: event_ts = base + position seconds",
    )


class SequencesConfig(_Frozen):
    min_seq_len: int = Field(3, ge=2, description=(
        "users with fewer items are dropped (quarantined): leave-one-out needs 2 (valid and test targets), "
        "3 leaves at least one history item for the prompt"))
    max_seq_len: int = Field(200, ge=2, description="keep only the most recent items of longer sequences")
    k_core: int = Field(0, ge=0, description="iterative k-core filter on users and items; 0 disables")
    dedup_consecutive_only: bool = Field(
        False, description="false: keep the first occurrence of an item per user; true: only drop immediate repeats"
    )

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_seq_len < self.min_seq_len:
            raise ValueError(f"max_seq_len {self.max_seq_len} < min_seq_len {self.min_seq_len}: every user would be quarantined")
        return self


class PromptsConfig(_Frozen):
    version: str = Field("v1", description="template version; part of the prompt hash")
    max_items: int = Field(20, description="most recent history items shown in a prompt")
    max_chars: int = Field(4000, description="character budget of the teacher prompt; oldest items dropped first")
    max_item_title_chars: int = Field(120, description="per-item title cap inside prompts")
    student_max_items: int = Field(10, description="most recent history items shown in the student prompt")
    student_title_chars: int = Field(60, description="per-item title cap inside the student prompt")


class TrackingConfig(_Frozen):
    mlflow_uri: str | None = Field(
        "_mlflow/mlflow.db",
        description="where `slim run` and `slim refresh` log one MLflow run each (slimrec.tracking): a tracking "
        "server URL (http://host:5000), any MLflow tracking URI, or a file path: a local SQLite store, "
        "artifacts beside it; a relative path lies under the lake root (the current directory when the lake "
        "is an object store). null or empty: no tracking. Credentials go in MLFLOW_TRACKING_USERNAME / "
        "MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, never in the URL",
    )
    experiment: str = Field("slimrec", description="MLflow experiment the runs go to (created when missing)")
    http_timeout_s: int = Field(
        5, ge=1, description="seconds one request to a tracking server may take (MLFLOW_HTTP_REQUEST_TIMEOUT, "
        "unless the environment sets it)")
    http_max_retries: int = Field(
        1, ge=0, description="retries of a failed request (MLFLOW_HTTP_REQUEST_MAX_RETRIES, unless the "
        "environment sets it); a server that stays down costs about (retries + 1) x http_timeout_s")
    http_backoff_factor: int = Field(
        1, ge=0, description="wait between retries: the first follows at once, retry n waits factor x 2^(n-1) "
        "seconds, plus up to 1 s of jitter (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, unless the environment sets it)")


class CostConfig(_Frozen):
    """Prices of compute for the cost table (slimrec.cost); the teacher's token prices are teacher.prices."""

    cpu_hour_usd: float = Field(
        0.05, ge=0, description="USD per CPU-hour (one core busy for an hour). The default is a rough on-demand "
        "cloud price of one vCPU (2025 list prices of general-purpose instances, about 0.04-0.05); it is the "
        "user's to set for their machines. 0 leaves CPU time out of the dollars")
    gpu_hour_usd: float = Field(
        2.50, ge=0, description="USD per GPU-hour of the GPUs a stage reserved. The default is a rough on-demand "
        "price of one data-centre GPU (A100/H100 class, 2-4 USD an hour at GPU clouds in 2025); the user's to "
        "set. Where a GPU-hour price already covers its host's CPUs, set cpu_hour_usd to 0 on that machine")
    sample_interval_s: float = Field(
        2.0, gt=0, description="seconds between samples of the process tree's CPU times while a stage runs "
        "(Spark JVM, Ray processes); a process that ends between samples loses at most this much of its CPU time "
        "unless the driver itself reaps it")


class RetrievalConfig(_Frozen):
    """Which users the student writes for, and how the others get a rationale (stage retrieve_rationales)."""

    student_users: Literal["all", "seed_pool"] = Field("all", description=(
        "all: the student writes for every user with a prompt (a rerun writes only for users whose prompt or "
        "model changed); seed_pool: only for a pool of seed_pool_share of the users (a seeded hash of user_id, "
        "so a user stays in or out of the pool across runs), and every other user gets the rationale of the k "
        "nearest pool users (retrieve_rationales)"))
    seed_pool_share: float = Field(0.2, gt=0, le=1, description="share of users in the seed pool (seed_pool only)")
    seed: int = Field(0, description="seed of the pool's hash of user_id")
    k: int = Field(5, ge=1, description=(
        "neighbours a retrieved rationale is taken from: its vector is their similarity-weighted mean, its "
        "grounded items their similarity-weighted vote, its text the nearest one's"))
    max_items: int = Field(5, ge=1, description="grounded items a retrieved rationale keeps, at most (top of the vote)")
    batch_users: int = Field(65_536, ge=1, description="users searched per faiss call (bounds the driver's memory)")


class PipelineConfig(_Frozen):
    profile: str = Field("dev", description="name of the profile this config started from")
    dataset_name: str = Field("dataset", description="short name of the data set, written to metrics")
    spark: SparkConfig = Field(default_factory=SparkConfig, description="Spark session")
    lake: LakeConfig = Field(default_factory=LakeConfig, description="Delta lake location")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="ingest stage")
    sequences: SequencesConfig = Field(default_factory=SequencesConfig, description="build_sequences stage")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="build_prompts stage")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="teacher_rationales stage")
    student: StudentConfig = Field(default_factory=StudentConfig, description="distill_student / student_rationales")
    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="embed stage")
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig, description=(
        "seed pool of student users and rationales by retrieval for the rest (student_rationales, retrieve_rationales)"))
    recommender: RecommenderConfig = Field(default_factory=RecommenderConfig, description="train_recommender")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Great Expectations gates")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking of each command")
    cost: CostConfig = Field(default_factory=CostConfig, description="compute prices and CPU sampling of the cost table")
    ray_address: str | None = Field(None, description="Ray cluster address; None starts or joins a local Ray")

    def as_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def config_hash(self) -> str:
        return hashlib.sha1(self.as_json().encode()).hexdigest()[:12]


class ConfigError(ValueError):
    """A config file or override that does not fit the declared types."""


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> dict:
    """``"a.b.c=3"`` -> ``{"a": {"b": {"c": 3}}}``; the value is parsed as YAML (``[x,y]``, ``true``, ``1e-3``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e.problem})") from None
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(
    profile: str = "dev", config_file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    """Profile YAML, then the user's YAML file, then ``key=value`` overrides."""
    path = PROFILES / f"{profile}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.name[:-5] for p in PROFILES.iterdir() if p.name.endswith(".yaml")))
        raise ConfigError(f"unknown profile {profile!r}; known: {known}")
    data: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    data["profile"] = profile
    if config_file is not None:
        cf = Path(config_file)
        if not cf.exists():
            raise ConfigError(f"config file {cf} does not exist")
        try:
            data = _deep_merge(data, yaml.safe_load(cf.read_text()) or {})
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {cf} is not valid YAML: {e}") from None
    for item in overrides:
        data = _deep_merge(data, parse_override(item))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid config: " + "; ".join(lines)) from None

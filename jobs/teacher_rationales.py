"""slim stage teacher_rationales --lake lake --profile dev [--dry-run] [--set teacher.kind=http ...]

Same as ``python jobs/teacher_rationales.py --lake lake --profile dev``; against an OpenAI-compatible endpoint:
``OPENAI_API_KEY=... python jobs/teacher_rationales.py --lake lake --dry-run --set teacher.kind=http
--set teacher.http.model=gpt-4o-mini --set teacher.max_cost_usd=5`` (drop ``--dry-run`` to send); on a Ray
cluster: ``ray job submit --address http://HEAD:8265 -- python jobs/teacher_rationales.py --lake s3://...
--set ray_address=auto --set teacher.kind=http --set teacher.http.base_url=http://vllm:8000/v1``.

Table of contents (``slimrec.stages.teacher_rationales.run``):
1. config: ``teacher.*`` (kind, sample, budget caps, price table, ``http.*`` endpoint and limits, ``offline.*``);
2. read: the latest prompt per user up to the run date, items, user_sequences (histories only) and the cache;
3. plan: stratified sample, anti-join against ``teacher_rationales``, dry-run estimate (calls, tokens, cost);
4. transform: offline teacher, or HTTP teacher on Ray actors (rate limit, retries, Retry-After, timeouts);
5. write: MERGE on (prompt_hash, teacher_model) every ``commit_batch_size`` answers (a crash loses one batch);
6. validate: the quality gate on teacher_rationales (skip with ``--no-check``).
"""

from __future__ import annotations

import sys

from slimrec.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["stage", "teacher_rationales", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

"""slim stage student_rationales --lake lake --profile dev [--set student.infer.batch_size=64] [--dry-run]

Same as ``python jobs/student_rationales.py --lake lake --profile dev``; on a Ray cluster with GPUs:
``ray job submit --address http://HEAD:8265 -- python jobs/student_rationales.py --lake /shared/lake
--set ray_address=auto --set student.infer.engine=vllm --set student.infer.num_actors=8
--set student.vllm.tensor_parallel_size=1``.

Table of contents (``slimrec.stages.student_rationales.run``):
1. config: ``student.model_version`` (latest by default), ``student.infer.*``, ``student.vllm.*``;
2. read: student_models (base + adapter), prompts (latest per user up to the run date),
   student_rationales (what exists), items (to ground step-3 titles);
3. transform: anti-join on (user_id, prompt_hash, model_version), then a Ray Data actor pool
   generating rationales (transformers on CPU, or vLLM + LoRA on GPUs), parsed into steps;
4. write: MERGE on (user_id, run_date, model_version) every ``infer.write_batch_rows`` rows;
5. validate: the quality gate on student_rationales (skip with ``--no-check``).
"""

from __future__ import annotations

import sys

from slimrec.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["stage", "student_rationales", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

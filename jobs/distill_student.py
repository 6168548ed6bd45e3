"""slim stage distill_student --lake lake --profile dev [--set student.train.epochs=3] [--dry-run] [--force]

Same as ``python jobs/distill_student.py --lake lake --profile dev``; on a Ray cluster with GPUs:
``ray job submit --address http://HEAD:8265 -- python jobs/distill_student.py --lake /shared/lake
--set ray_address=auto --set student.base_model=/models/Llama-2-7b-hf --set student.train.use_gpu=true
--set student.train.num_workers=4 --set student.models_dir=/shared/models``.

Table of contents (``slimrec.stages.distill_student.run``):
1. config: ``student.*`` (base model, pairs, LoRA, Ray Train job, held-out quality bar);
2. read: teacher_rationales (ok rows), prompts (student prompts), items (to build the builtin base);
3. transform: pairs split by user, the base built or reused, a TorchTrainer LoRA job with
   per-epoch val loss and checkpoints, then ROUGE-L of student and un-adapted base on held-out users;
4. write: one MERGE into student_models (model_version, base, adapter path, LoRA config,
   metrics, input versions); nothing when the adapter does not beat the base by ``min_rouge_gain``;
5. validate: the quality gate on student_models (skip with ``--no-check``).
"""

from __future__ import annotations

import sys

from slimrec.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["stage", "distill_student", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

"""slim stage train_recommender --lake lake --profile dev [--set recommender.backbones=[sasrec,gru4rec]]

Same as ``python jobs/train_recommender.py --lake lake --profile dev``. The full benchmark (every backbone,
5 seeds, 200 epochs): add the ``--set`` lines of ``slimrec.recommender.config.FULL_BENCHMARK_OVERRIDES``.
On a Ray cluster with GPU workers: ``ray job submit --address http://HEAD:8265 -- python
jobs/train_recommender.py --lake s3://... --set ray_address=auto --set recommender.use_gpu=true
--set recommender.num_workers=4 --set recommender.artifacts_dir=s3://.../recommender``.

Table of contents (``slimrec.stages.train_recommender.run``):
1. config: ``recommender.*`` (backbones, variants, seeds, model and training knobs, fusion, priors, Ray);
2. read: user_sequences and items; item_embeddings, rationale_embeddings, teacher_rationales and
   student_rationales when they exist (variants that need a missing one are reported, never faked);
3. transform: one Ray Train TorchTrainer job over every (backbone, seed): train with early stopping on
   validation NDCG@10, checkpoint, evaluate both protocols; then random/popular/transition baselines;
4. write: metrics and recommender_runs (append, keyed by run_id), recommendations (this run date's slice);
   the results table (test target, mean±std over seeds) is logged;
5. validate: the quality gate on the written tables (skip with ``--no-check``).
"""

from __future__ import annotations

import sys

from slimrec.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["stage", "train_recommender", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

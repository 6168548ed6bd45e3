"""slim stage retrieve_rationales --lake lake --profile dev --set retrieval.student_users=seed_pool [--dry-run]

Same as ``python jobs/retrieve_rationales.py --lake lake ...``; on a cluster it runs on the driver alone
(faiss, no Spark, no Ray workers): ``ray job submit --address http://HEAD:8265 -- python
jobs/retrieve_rationales.py --lake s3://... --set retrieval.student_users=seed_pool``.

Table of contents (``slimrec.stages.retrieve_rationales.run``):
1. config: ``retrieval.*`` (student_users, seed_pool_share, seed, k, max_items); skipped unless seed_pool;
2. read: prompts, user_sequences, student_models, student_rationales, item_embeddings, rationale_embeddings;
3. transform: user vectors (mean item text vector of the history), k nearest pool users by cosine (faiss),
   their rationale vectors and grounded items blended by similarity;
4. write: one MERGE per table (student_rationales rows with rationale_source=retrieved, their vectors in
   rationale_embeddings); unchanged rows are not written again;
5. validate: the quality gate on both tables (skip with ``--no-check``).
"""

from __future__ import annotations

import sys

from slimrec.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["stage", "retrieve_rationales", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

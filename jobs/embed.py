"""slim stage embed --lake lake --profile dev [--set embed.rationale_text=steps] [--dry-run]

Same as ``python jobs/embed.py --lake lake --profile dev``; on a Ray cluster:
``ray job submit --address http://HEAD:8265 -- python jobs/embed.py --lake s3://... --set ray_address=auto``.

Table of contents (``slimrec.stages.embed.run``):
1. config: ``embed.*`` (encoder, pooling, normalisation, max length, rationale text, Ray actor pool);
2. read: items, student_rationales and teacher_rationales (a missing rationale table is skipped);
3. transform: anti-join against item_embeddings / rationale_embeddings for this encoder, then encode
   only the changed texts on a Ray Data actor pool (one model per actor);
4. write: one MERGE commit per output table on its key (none when nothing changed);
5. validate: the quality gate on item_embeddings and rationale_embeddings (skip with ``--no-check``).
"""

from __future__ import annotations

import sys

from slimrec.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["stage", "embed", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

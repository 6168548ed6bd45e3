"""A tiny base model built once per test session from the synthetic catalogue."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """(path, corpus, pairs frame): a built tiny Llama and 60 synthetic (prompt, teacher answer) pairs."""
    from slimrec.student.data import training_pairs
    from slimrec.student.tiny_model import build_corpus, ensure_tiny_model
    from student_helpers import histories, items_frame, prompts_frame, small_tiny_config, teacher_frame

    items = items_frame()
    hists = histories(60, seed=1)
    prompts = prompts_frame(hists, items)
    teacher = teacher_frame(prompts, hists, items)
    cfg = small_tiny_config()
    pairs = training_pairs(teacher, prompts)
    # The same corpus distill_student builds from such a lake: catalogue + the pairs' prompts and answers.
    corpus = build_corpus(items, pairs["student_prompt"].tolist(), pairs["rationale"].tolist(), cfg)
    path, _ = ensure_tiny_model(tmp_path_factory.mktemp("models"), corpus, cfg)
    return path, corpus, pairs

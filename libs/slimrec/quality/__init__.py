"""Great Expectations gates between stages.

``validate_table(lake, table, cfg=..., spark=..., version=..., run_date=..., docs_dir=...) -> ValidationReport``
``gate(...)`` the same, plus dq_results and :class:`QualityGateError` on failure.

Exports are resolved lazily: ``slimrec.config`` imports ``slimrec.quality.config``,
and that import must not pull in Spark, Delta or Great Expectations.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "QualityConfig": "slimrec.quality.config",
    "QualityError": "slimrec.quality.slices",
    "Slice": "slimrec.quality.slices",
    "plan_slice": "slimrec.quality.slices",
    "QualityGateError": "slimrec.quality.validate",
    "ValidationReport": "slimrec.quality.validate",
    "ExpectationOutcome": "slimrec.quality.validate",
    "validate_table": "slimrec.quality.validate",
    "gate": "slimrec.quality.validate",
    "write_dq_results": "slimrec.quality.validate",
    "render_docs": "slimrec.quality.validate",
    "resolve_thresholds": "slimrec.quality.validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slimrec.quality' has no attribute {name!r}")

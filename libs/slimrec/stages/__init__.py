"""Stage runners: one module per table, each with run(ctx) -> StageResult."""

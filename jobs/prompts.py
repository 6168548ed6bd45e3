"""Writes prompts (teacher and student chain-of-thought prompts) for the run date.

    spark-submit --master spark://HOST:7077 jobs/prompts.py --lake DIR [--run-date YYYY-MM-DD] [--set key=value]
    python jobs/prompts.py --lake lake

Same as `slim stage build_prompts`; the package `slimrec` must be installed where the driver and executors run.
"""

from slimrec.cli import stage_main

if __name__ == "__main__":
    stage_main("build_prompts")

"""Writes user_sequences (leave-one-out sequences) from interactions.

    spark-submit --master spark://HOST:7077 jobs/user_sequences.py --lake DIR [--run-date YYYY-MM-DD] [--set key=value]
    python jobs/user_sequences.py --lake lake

Same as `slim stage build_sequences`; the package `slimrec` must be installed where the driver and executors run.
"""

from slimrec.cli import stage_main

if __name__ == "__main__":
    stage_main("build_sequences")

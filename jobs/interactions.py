"""Writes raw_interactions, raw_items, items, interactions and quarantine from a dataset folder.

    spark-submit --master spark://HOST:7077 jobs/interactions.py --dataset data/amazon_office_2014 --lake DIR [--run-date YYYY-MM-DD] [--set key=value]
    python jobs/interactions.py --dataset data/amazon_office_2014 --lake lake

Same as `slim stage ingest`; the package `slimrec` must be installed where the driver and executors run.
"""

from slimrec.cli import stage_main

if __name__ == "__main__":
    stage_main("ingest")

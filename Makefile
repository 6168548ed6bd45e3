PY := .venv/bin/python
SLIM := .venv/bin/slim

.PHONY: setup run demo-s3 test lint bench report clean

setup: ; python3.11 -m venv .venv && $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q torch==2.13.0 && $(PY) -m pip install -q -e '.[dev]' && $(PY) -m slimrec.java --install
run: ; $(SLIM) run --dataset data/amazon_office_2014 --lake lake --profile dev && $(SLIM) report --lake lake
test: ; $(PY) -m pytest -q tests
# the whole pipeline with the lake on a local S3 server (SeaweedFS, started and stopped here; data kept in .s3-demo/)
demo-s3: ; $(PY) -m slimrec.s3server --dir .s3-demo -- sh -c '$(SLIM) run --dataset data/amazon_office_2014 --lake s3://slim/lake --profile tiny && $(SLIM) report --lake s3://slim/lake --out .s3-demo/results.md --no-readme'
lint: ; .venv/bin/ruff check libs jobs schemas tests bench
bench: ; $(PY) -m bench.run_all
report: ; $(SLIM) report --lake lake
clean: ; rm -rf lake reports .pytest_cache .s3-demo .slimrec-local

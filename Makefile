PY := .venv/bin/python
SLIM := .venv/bin/slim

.PHONY: setup run test lint bench report clean

setup: ; python3.11 -m venv .venv && $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q torch==2.13.0 && $(PY) -m pip install -q -e '.[dev]' && $(PY) -m slimrec.java --install
run: ; $(SLIM) run --dataset data/amazon_office_2014 --lake lake --profile dev && $(SLIM) report --lake lake
test: ; $(PY) -m pytest -q tests
lint: ; .venv/bin/ruff check libs jobs schemas tests bench
bench: ; $(PY) -m bench.run_all
report: ; $(SLIM) report --lake lake
clean: ; rm -rf lake reports .pytest_cache

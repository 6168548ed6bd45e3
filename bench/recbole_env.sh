#!/usr/bin/env bash
# RecBole's own virtual environment for `python -m bench.recbole`: bench/.recbole-venv (gitignored).
#
#   bash bench/recbole_env.sh            # creates it, or completes it; safe to rerun
#
# Not the project's .venv: RecBole 1.2.1 (the latest release) requires ray<=2.6.3, and
# `.venv/bin/python -m pip install --dry-run recbole==1.2.1` would replace the pinned ray==2.60.0 with 2.6.3.
# Pins: RecBole 1.2.1; numpy 1.26 and pandas 2.2 (RecBole's data code predates numpy 2 and pandas 3);
# torch 2.13.0, the project's own pin (the CPU wheel where pip finds one: the PyTorch CPU index when it
# answers, else what the machine's pip configuration offers, else PyPI's build). The other packages are
# what RecBole 1.2.1 itself asks for.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=bench/.recbole-venv
PY=${PYTHON:-python3.11}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
CPU_INDEX=https://download.pytorch.org/whl/cpu
if "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$CPU_INDEX/torch/', timeout=10)" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q torch==2.13.0 --extra-index-url "$CPU_INDEX"
else
  "$VENV/bin/python" -m pip install -q torch==2.13.0
fi
"$VENV/bin/python" -m pip install -q recbole==1.2.1 "numpy==1.26.4" "pandas==2.2.3" "scipy==1.13.1"
"$VENV/bin/python" -P -c "import recbole, torch, numpy, pandas; print('RecBole', recbole.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__, 'pandas', pandas.__version__)"

#!/usr/bin/env bash
# GPU check of the student (and any other tests/gpu tests): installs nothing, runs the `gpu`-marked
# tests and prints what it ran on and the results. Needs a CUDA GPU and the project installed with its
# gpu extra (pip install -e '.[gpu]': vllm==0.32.0). Usage, from the repo root:
#   bash tests/gpu/run_gpu_check.sh            # uses .venv/bin/python when present, else python3
#   PY=/path/to/python bash tests/gpu/run_gpu_check.sh
set -u
cd "$(dirname "$0")/../.."
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PY" - <<'PY'
import importlib.util, sys
print("python", sys.version.split()[0])
try:
    import torch
    print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except ImportError:
    print("torch: not installed")
for name in ("transformers", "peft", "vllm", "ray"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        print(name, ": not installed (the tests that need it are skipped)")
    else:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
PY
echo "== gpu tests"
"$PY" -m pytest -m gpu tests/gpu -v -s -rA -p no:cacheprovider
rc=$?
echo "== exit code $rc (0: all passed; 5: none collected; skipped tests name their reason above)"
exit $rc

#!/usr/bin/env bash
# The GPU check (issue 27): on a machine with one CUDA GPU, in under 8 minutes, the CUDA-only tests
# (every test with "cuda" in its name; they skip on a CPU machine) and then the GPU figures of
# benchmarks/gpu_check.py, on models built in code with random weights (nothing is downloaded).
#
# The lent GPU machine has its own torch and no package index: featopt runs from this checkout
# (PYTHONPATH), and the transformers that featopt supports travels as a wheel in .whl/ (made here by
# the command in benchmarks/README.md, "GPU check"). Figures go to $OUT (the device tool's folder) or
# featopt-runs/gpu-check: tests.log, figures.log, gpu_check.json.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-featopt-runs/gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" \
  || exit 1
timeout 150 python3 -m pytest -q -rs -k cuda -p no:cacheprovider --continue-on-collection-errors tests \
  2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
timeout 330 python3 benchmarks/gpu_check.py --out "$out" 2>&1 | tee "$out/figures.log"
figures=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, figures exit $figures"
[ "$tests" -eq 0 ] && [ "$figures" -eq 0 ]

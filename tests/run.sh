#!/usr/bin/env bash
# The test command (README): the whole suite on CPU. Triton kernels run under TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || export TRITON_INTERPRET=1
exec python3 -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Set up the project-local virtual environment: scripts/setup.sh [run|test]
#   run   torch (the CPU build, only where no torch is installed yet), then the package
#   test  the same, plus the test tools (pytest, pytest-benchmark, hypothesis) and the test peers
#         (spikingjelly, snntorch without their dependencies, loguru, nir, ray)
# Every pip call takes the pins in constraints.txt. Environment: PYTHON (default python3), VENV (default .venv),
# TORCH_PIP_ARGS (extra pip arguments for the torch install, e.g. an --index-url serving CPU wheels where the
# default index gives a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-run}
case "$what" in run|test) ;; *) echo "usage: scripts/setup.sh [run|test]" >&2; exit 2 ;; esac
python=${PYTHON:-python3}
venv=${VENV:-.venv}

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  # system site packages stay visible, so a torch that is already installed (a GPU build) is kept
  "$python" -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)
constraints=constraints.txt
if torch_version=$("$py" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  constraints="$venv/constraints-kept-torch.txt"
  if triton_version=$("$py" -c "import triton; print(triton.__version__)" 2>/dev/null); then
    echo "setup: keeping the installed torch $torch_version and Triton $triton_version"
    grep -v -E '^(torch|triton)([^A-Za-z0-9_.-]|$)' constraints.txt > "$constraints"
  else
    echo "setup: keeping the installed torch $torch_version"
    grep -v -E '^torch([^A-Za-z0-9_.-]|$)' constraints.txt > "$constraints"
  fi
else
  echo "setup: installing torch (CPU build)"
  # shellcheck disable=SC2086
  "${pip[@]}" install -q -c constraints.txt ${TORCH_PIP_ARGS:-} torch
fi
if [ "$what" = test ]; then
  echo "setup: installing binwslt (editable) with its test tools and the test peers"
  "${pip[@]}" install -q -c "$constraints" -e ".[test]"
  "${pip[@]}" install -q -c "$constraints" --no-deps spikingjelly snntorch nirtorch  # nirtorch: SpikingJelly's NIR import (tests)
  "${pip[@]}" install -q -c "$constraints" loguru nir ray
else
  echo "setup: installing binwslt (editable)"
  "${pip[@]}" install -q -c "$constraints" -e .
fi
"$py" -c "import binwslt, torch; print('setup: binwslt', binwslt.__version__, 'torch', torch.__version__)"

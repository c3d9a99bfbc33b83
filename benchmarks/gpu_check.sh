#!/usr/bin/env bash
# The one command for a GPU machine (README "Running the GPU check"):
#   bash benchmarks/gpu_check.sh [--budget SECONDS] [--out DIR] [--dry-run]
# Phases, each with its own deadline taken from the global budget (default 480 s), each writing its file after
# every case so that a cut-off still returns what finished (at most 8 files, all in DIR):
#   env.json, install.log (offline install + peer wheels from .whl/), correctness.json, kernels.json,
#   tests.log, bench.json, summary.md (always written last, from whatever exists).
# --dry-run: every phase on the CPU with Triton's interpreter and tiny shapes (CI runs it). Needs no network.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BUDGET=480
DRY=0
DIR="${OUT:-}"   # the device tool's $OUT comes back: the default there
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET="$2"; shift 2 ;;
    --out) DIR="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (use --budget SECONDS, --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac
if [ "$BUDGET" -lt 60 ]; then echo "gpu_check.sh: --budget must be >= 60 s, got $BUDGET" >&2; exit 2; fi
[ -n "$DIR" ] || DIR="benchmarks/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$DIR" || exit 2
DIR="$(cd "$DIR" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
END=$((START + BUDGET))
RESERVE=15          # seconds kept for summary.md
DRYFLAG=""
if [ "$DRY" = 1 ]; then DRYFLAG="--dry-run"; export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
STATUS=0

# phase NAME PERCENT CMD...: run CMD with a share of the budget (never past END - RESERVE). The command gets
# DEADLINE (epoch s, at 85% of its share: start no new case after it) and is killed at the end of its share.
phase() {
  local name="$1" share="$2"; shift 2
  local now left alloc
  now=$(date +%s); left=$((END - RESERVE - now)); alloc=$((BUDGET * share / 100))
  [ "$alloc" -gt "$left" ] && alloc=$left
  if [ "$alloc" -lt 5 ]; then echo "== $name: skipped, budget spent"; return 0; fi
  export DEADLINE=$((now + alloc * 85 / 100))
  echo "== $name: ${alloc} s (t=$((now - START)) s)"
  timeout -k 5 "$alloc" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "== $name: cut off at its ${alloc} s (files hold the cases that finished)"
  [ $rc -ne 0 ] && STATUS=1
  echo "== $name: exit $rc after $(( $(date +%s) - now )) s"
  return 0
}

install() {
  {
    echo "# offline install $(date -u +%FT%TZ), python: $(command -v "$PY")"
    if "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . 2>&1; then
      echo "binwslt: installed editable from $ROOT"
    else
      echo "binwslt: pip install -e . failed; PYTHONPATH fallback (benchmarks/gpu_check_site.py as sitecustomize)"
      mkdir -p /tmp/binwslt-gpu-check-path && cp benchmarks/gpu_check_site.py /tmp/binwslt-gpu-check-path/sitecustomize.py
    fi
    if ls .whl/*.whl >/dev/null 2>&1; then
      echo "peers: installing $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/binwslt-gpu-check-site .whl/*.whl 2>&1 \
        && echo "peers: installed into /tmp/binwslt-gpu-check-site"
    else
      echo "peers: no .whl/ folder (README 'Running the GPU check' fills it); using whatever is installed"
    fi
  } >"$DIR/install.log" 2>&1
}

echo "== env"
timeout -k 5 60 "$PY" benchmarks/gpu_check.py env --out "$DIR" $DRYFLAG || STATUS=1   # seconds; outside the shares
phase install 10 bash -c "$(declare -f install); PY='$PY' ROOT='$ROOT' DIR='$DIR' install"
[ -d /tmp/binwslt-gpu-check-site ] && export PYTHONPATH="/tmp/binwslt-gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
if [ -f /tmp/binwslt-gpu-check-path/sitecustomize.py ]; then
  export PYTHONPATH="/tmp/binwslt-gpu-check-path:$ROOT${PYTHONPATH:+:$PYTHONPATH}" BINWSLT_ROOT="$ROOT"
fi
tail -n 3 "$DIR/install.log"
timeout -k 5 60 "$PY" benchmarks/gpu_check.py env --out "$DIR" $DRYFLAG   # again: the peers' versions after the install

phase correctness 25 bash -c "\"$PY\" benchmarks/gpu_check.py correctness --out '$DIR' --deadline \$DEADLINE $DRYFLAG"
phase kernels 22 bash -c "\"$PY\" benchmarks/gpu_check.py kernels --out '$DIR' --deadline \$DEADLINE $DRYFLAG"

tests() {
  # the GPU tests first (marked gpu: skipped under the interpreter), then the Triton comparisons with what is left
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest tests/test_gpu_check.py -q -rfEs -p no:cacheprovider
    "$PY" -m pytest tests -m gpu -q -rfEs -p no:cacheprovider
  else
    "$PY" -m pytest tests -m gpu -v -rfEs -p no:cacheprovider
    "$PY" -m pytest tests/test_gpu_check.py tests/test_triton_lif.py tests/test_triton_linear.py \
      tests/test_triton_conv.py tests/test_triton_subnet.py -m "not gpu" -q -rfEs -p no:cacheprovider
  fi
}
phase tests 18 bash -c "$(declare -f tests); PY='$PY' DRY=$DRY tests > '$DIR/tests.log' 2>&1"
tail -n 2 "$DIR/tests.log" 2>/dev/null

# benchmarks/run.py with whatever is left (no new case after --max-minutes; its JSON is rewritten after each case)
now=$(date +%s); left=$((END - RESERVE - now - 10))
if [ "$DRY" = 1 ]; then
  phase bench 100 "$PY" benchmarks/run.py --device cpu --quick --only layers --impls reference torch triton floor \
    --out "$DIR/bench.json" --max-minutes "$(awk "BEGIN{print ($left>0?$left:0)/60*0.8}")"
else
  phase bench 100 "$PY" benchmarks/run.py --device cuda --out "$DIR/bench.json" \
    --max-minutes "$(awk "BEGIN{print ($left>0?$left:0)/60*0.8}")"
fi

"$PY" benchmarks/gpu_check.py summary --out "$DIR" || STATUS=1
echo "== gpu_check: $(ls "$DIR" | wc -l) files in $DIR after $(( $(date +%s) - START )) s (budget $BUDGET s), status $STATUS"
exit $STATUS

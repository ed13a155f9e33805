#!/usr/bin/env bash
# gpu_tests/run.sh [OUTDIR]: prove devicemem's CUDA path on a GPU machine, in one run.
#
# 1. Refuses (exit 2) unless torch sees a CUDA GPU, before installing or writing anything.
# 2. Makes pyro-ppl importable if it is missing: pip install --no-index --no-deps --target a
#    temporary directory from the local wheels (no network; the system Python is untouched).
# 3. Runs the GPU test-suite (pytest gpu_tests), then the CUDA bench workloads (python -m bench
#    --quick --only W6; only W6a, params only, when less than BENCH_W6_S is left), each under a
#    time limit, so the whole run ends within the budget.
# 4. Writes OUTDIR/summary.json (every step, test outcomes, the measured figures, the bench
#    rows), OUTDIR/pytest.log, OUTDIR/gpu_tests.json, OUTDIR/bench.log and OUTDIR/bench/.
# Exits 0 only when every step passed.
#
# Environment: PYTHON (default python3, else python), DEVICEMEM_WHEELS (default gpu_tests/wheels),
# GPU_TESTS_BUDGET_S (default 470: the whole run's wall-clock limit in seconds), GPU_TESTS_BENCH
# (the bench's --only; default: W6, or W6a when time is short).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
PYTHON=${PYTHON:-$(command -v python3 || echo python)}
wheels=${DEVICEMEM_WHEELS:-$here/wheels}
budget=${GPU_TESTS_BUDGET_S:-470}
out=${1:-$here/out}
case $out in /*) ;; *) out=$PWD/$out ;; esac  # the script works from the repository root
# Estimated seconds for all of bench W6 --quick on one H200: generating the 21,761 x 31,467 data
# set (~150), W6a params-only GPU vs CPU (~60), W6b posterior predictive on the GPU (~120).
BENCH_W6_S=330
download="pip download --no-deps -d gpu_tests/wheels pyro-ppl==1.9.2 opt-einsum pyro-api"

say() { echo "gpu_tests/run.sh: $*" >&2; }

# 1. A GPU, or nothing at all.
gpu=$("$PYTHON" - 2>&1 <<'EOF'
import sys
try:
    import torch
except Exception as exc:
    sys.exit(f"torch cannot be imported ({type(exc).__name__}: {exc})")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (built with CUDA {torch.version.cuda}) sees no CUDA GPU: "
             "torch.cuda.is_available() is False")
print(torch.cuda.get_device_name(0))
EOF
)
if [ $? -ne 0 ]; then
    say "refusing to run: ${gpu##*$'\n'}"
    say "these tests prove the CUDA path and need an NVIDIA GPU; nothing was installed or written"
    exit 2
fi
say "GPU: $gpu; writing to $out"
cd "$repo" || exit 2

# 2. pyro-ppl from the local wheels when it is missing.
site=""
if ! "$PYTHON" -c "import pyro" >/dev/null 2>&1; then
    shopt -s nullglob
    found=("$wheels"/*.whl)
    shopt -u nullglob
    if [ ${#found[@]} -eq 0 ]; then
        say "pyro-ppl is not installed and $wheels has no wheels; on a machine with PyPI run"
        say "  $download"
        say "and carry gpu_tests/wheels (or point DEVICEMEM_WHEELS at them)"
        exit 2
    fi
    site=$(mktemp -d "${TMPDIR:-/tmp}/devicemem-gpu-site.XXXXXX")
    trap 'rm -rf "$site"' EXIT
    say "installing ${found[*]##*/} into $site"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-cache-dir --no-compile --disable-pip-version-check \
            --target "$site" "${found[@]}" || { say "pip could not install the wheels"; exit 2; }
    else  # pure-Python wheels are zip files laid out for site-packages
        for wheel in "${found[@]}"; do
            "$PYTHON" -m zipfile -e "$wheel" "$site" || { say "could not unpack $wheel"; exit 2; }
        done
    fi
fi
export PYTHONPATH="$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
if ! pyro_version=$("$PYTHON" -c "import pyro; print(pyro.__version__)" 2>&1); then
    say "pyro-ppl is still not importable: $pyro_version"
    exit 2
fi
mkdir -p "$out" || exit 2

# 3. The suite, then the bench workload, each within what is left of the budget.
left() { echo $(( budget - SECONDS - 15 > 30 ? budget - SECONDS - 15 : 30 )); }
export GPU_TESTS_OUT="$out"
started=$SECONDS
timeout --kill-after=10 $(( $(left) * 6 / 10 )) "$PYTHON" -u -m pytest -p no:cacheprovider -v -rA \
    --junitxml="$out/junit.xml" gpu_tests 2>&1 | tee "$out/pytest.log"
pytest_rc=${PIPESTATUS[0]}
pytest_s=$(( SECONDS - started ))

bench_only=${GPU_TESTS_BENCH:-W6}
if [ -z "${GPU_TESTS_BENCH:-}" ] && [ "$(left)" -lt "$BENCH_W6_S" ]; then
    bench_only=W6a
    say "$(left) s left, under the ~$BENCH_W6_S s all of W6 takes: running only W6a (params only)"
fi
started=$SECONDS
timeout --kill-after=10 "$(left)" "$PYTHON" -u -m bench --quick --only "$bench_only" --out "$out/bench" 2>&1 \
    | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
bench_s=$(( SECONDS - started ))

# 4. One summary; its exit status is the script's.
"$PYTHON" -m gpu_tests.summarize "$out" --gpu "$gpu" --pyro "$pyro_version" \
    --step "pytest=$pytest_rc:$pytest_s" --step "bench $bench_only=$bench_rc:$bench_s" --total-s "$SECONDS"

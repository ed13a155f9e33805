#!/usr/bin/env bash
# gpu_tests/run.sh [--dry-run] [OUTDIR]: prove devicemem's CUDA path on a GPU machine, in one run.
#
# 1. Refuses (exit 2) unless torch sees a CUDA GPU, before installing or writing anything.
# 2. Makes the suite's missing packages importable: of pyro-ppl, opt-einsum, pyro-api, pytest,
#    iniconfig, pluggy, packaging and pygments, each one the machine lacks is unpacked from its
#    carried wheel (gpu_tests/wheels, made by `make gpu-wheels`) into a temporary directory on
#    PYTHONPATH: no network, no pip, the system Python untouched.
# 3. Runs the GPU test-suite (pytest gpu_tests), then the CUDA bench workloads (python -m bench
#    --quick --only W6; only W6a, params only, when less than BENCH_W6_S is left), each under a
#    time limit, so the whole run ends within the budget.
# 4. Writes OUTDIR/summary.json (every step, test outcomes, the measured figures, the bench
#    rows), OUTDIR/pytest.log, OUTDIR/gpu_tests.json, OUTDIR/bench.log and OUTDIR/bench/.
# Exits 0 only when every step passed.
#
# --dry-run rehearses steps 1-2 on a machine without CUDA: PYTHON then runs with -S and sees the
# GPU node's packages only (gpu_tests/node_site.py links them into OUTDIR/node-site); step 2
# runs exactly as on the node; then it imports the bench step's modules, collects the suite
# (OUTDIR/collect.log) and stops before anything needs CUDA. Exit 0 when all of that worked.
#
# Environment: PYTHON (default python3, else python), DEVICEMEM_WHEELS (default gpu_tests/wheels),
# GPU_TESTS_BUDGET_S (default 540: the whole run's wall-clock limit in seconds), GPU_TESTS_BENCH
# (the bench's --only; default: W6, or W6a when time is short).
set -uo pipefail

dry_run=0
if [ "${1:-}" = --dry-run ]; then
    dry_run=1
    shift
fi
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
PYTHON=${PYTHON:-$(command -v python3 || echo python)}
wheels=${DEVICEMEM_WHEELS:-$here/wheels}
budget=${GPU_TESTS_BUDGET_S:-540}
out=${1:-$here/out}
case $out in /*) ;; *) out=$PWD/$out ;; esac  # the script works from the repository root
# Estimated seconds for all of bench W6 --quick on one H200: generating the 21,761 x 31,467 data
# set (~150), W6a params-only GPU vs CPU (~60), W6b posterior predictive on the GPU (~120).
BENCH_W6_S=330
# What the suite needs beyond the GPU node's packages: the module, and its wheel's name.
CARRIED=(pyro:pyro_ppl opt_einsum:opt_einsum pyroapi:pyro_api pytest:pytest iniconfig:iniconfig
         pluggy:pluggy packaging:packaging pygments:pygments)
# What the bench step (python -m bench --only W6) imports, in its driver and its children.
BENCH_MODULES=bench.__main__,bench.child,bench.baselines,bench.data,bench.harness,bench.workloads,bench.report

say() { echo "gpu_tests/run.sh: $*" >&2; }

# 1. A GPU, or nothing at all (a dry run: the GPU node's package set instead).
if [ $dry_run -eq 1 ]; then
    mkdir -p "$out/node-site" || exit 2
    node=$("$PYTHON" "$here/node_site.py" "$out/node-site") || { say "cannot link the node's packages"; exit 2; }
    printf '#!/bin/sh\nexec "%s" -S "$@"\n' "$PYTHON" > "$out/node-python" && chmod +x "$out/node-python" || exit 2
    PYTHON=$out/node-python
    export PYTHONPATH=$out/node-site
    gpu="none (dry run)"
    say "dry run: python -S with the GPU node's packages only: $node"
else
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
fi
cd "$repo" || exit 2

# 2. Each carried package the machine lacks, unpacked from its wheel (a pure-Python wheel is a
#    zip file laid out for site-packages; these have no .data or scripts for pip to place).
modules=("${CARRIED[@]%%:*}")
missing=$("$PYTHON" -c 'import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "${modules[@]}") \
    || { say "$PYTHON cannot run"; exit 2; }
site=""
if [ -n "$missing" ]; then
    found=()
    for entry in "${CARRIED[@]}"; do
        case " $missing " in *" ${entry%%:*} "*) ;; *) continue ;; esac
        shopt -s nullglob
        matches=("$wheels/${entry#*:}"-[0-9]*-py3-none-any.whl)
        shopt -u nullglob
        if [ ${#matches[@]} -ne 1 ]; then
            say "${entry%%:*} is not installed and $wheels holds ${#matches[@]} ${entry#*:}-*-py3-none-any.whl, not one;"
            say "on a machine with PyPI run \`make gpu-wheels\` and carry gpu_tests/wheels (or set DEVICEMEM_WHEELS)"
            exit 2
        fi
        found+=("${matches[0]}")
    done
    site=$(mktemp -d "${TMPDIR:-/tmp}/devicemem-gpu-site.XXXXXX") || exit 2
    trap 'rm -rf "$site"' EXIT
    say "not installed: $missing; unpacking ${found[*]##*/} into $site"
    for wheel in "${found[@]}"; do
        "$PYTHON" -m zipfile -e "$wheel" "$site" || { say "cannot unpack $wheel"; exit 2; }
    done
fi
export PYTHONPATH="$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
if ! pyro_version=$("$PYTHON" -c "import pyro, pytest; print(pyro.__version__)" 2>&1); then
    say "pyro-ppl or pytest is still not importable: ${pyro_version##*$'\n'}"
    exit 2
fi
mkdir -p "$out" || exit 2

if [ $dry_run -eq 1 ]; then
    "$PYTHON" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1].split(',')]" "$BENCH_MODULES" \
        || { say "dry run: the bench step's modules do not import with the node's packages"; exit 1; }
    "$PYTHON" -m pytest -p no:cacheprovider --collect-only -q gpu_tests > "$out/collect.log" 2>&1
    rc=$?
    tail -n 1 "$out/collect.log" >&2
    if [ $rc -ne 0 ]; then
        say "dry run: collecting gpu_tests failed (exit $rc); see $out/collect.log"
        exit 1
    fi
    say "dry run: pyro $pyro_version, bench modules imported, gpu_tests collected; stopping before CUDA is needed"
    exit 0
fi

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

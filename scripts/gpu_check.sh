#!/usr/bin/env bash
# One lease's GPU check, in one command: the card, the compiled kernels against their references, then timings.
#
#   bash scripts/gpu_check.sh            # results also land in ${OUT:-/tmp}/kernel_tests.txt and kernel_bench.md
#
# Needs only python3 with jax (GPU), numpy and pytest: the kernels are imported without jaxllm's serving stack.
# PYTHON picks the interpreter (default python3); BENCH_ARGS replaces the benchmark's flags (default --sweep).
set -euo pipefail

cd "$(dirname "$0")/.."
unset JAX_PLATFORMS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
out_dir=${OUT:-/tmp}
mkdir -p "$out_dir"
status=0

echo "== card"
nvidia-smi || echo "nvidia-smi failed or is missing"

echo "== jax"
"$PY" -c 'import jax; print("jax", jax.__version__, "backend", jax.default_backend()); print(jax.devices())'

echo "== kernel tests (compiled, -m gpu)"
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests/kernels 2>&1 | tee "$out_dir/kernel_tests.txt" || status=$?

echo "== kernel benchmark"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
"$PY" scripts/kernel_bench.py ${BENCH_ARGS:---sweep} | tee "$out_dir/kernel_bench.md" || status=$?

echo "== done (status $status): $out_dir/kernel_tests.txt, $out_dir/kernel_bench.md"
exit "$status"

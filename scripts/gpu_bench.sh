#!/usr/bin/env bash
# The one command that runs the GPU tests and the benchmarks on a CUDA machine, writing every
# result under $OUT (default ./gpu-out). Stages are independent: a failing stage is reported and the
# next one still runs. Usage: bash scripts/gpu_bench.sh [stage ...]   (default: all stages)
#
# Stages: tests (pytest tests/gpu), link (pinned bandwidth), experts (grouped vs loop),
#         none / cpu / cpu_auto (moetrain offload_step per tier), zero_offload (DeepSpeed peer).
#
# On a machine without the runtime packages, put their wheels (and the libaio debs) in .dev/ first;
# they are installed into a private site folder.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if ls .dev/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x "$f" /tmp/aio; done
  export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu \
         LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
else
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
STAGES=${*:-tests link experts none cpu cpu_auto zero_offload}
LAYERS=${LAYERS:-4} MICRO=${MICRO:-4} SEQ=${SEQ:-2048} ACCUM=${ACCUM:-4} STEPS=${STEPS:-6}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
date -u +%Y-%m-%dT%H:%MZ > "$OUT/date.txt"
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null || true

stage() {  # stage NAME CMD...: run, keep its log, never stop the script
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc ($((SECONDS - t0)) s)"; tail -n 4 "$OUT/$name.log"
}

bench_args="--layers $LAYERS --micro $MICRO --seq $SEQ --accum $ACCUM --steps $STEPS --out $OUT"
for s in $STAGES; do
  case $s in
    tests) stage tests python3 -m pytest -q -x tests/gpu -p no:cacheprovider ;;
    link) stage link python3 -m moetrain.bench.link --out "$OUT" ;;
    experts) stage experts python3 -m moetrain.bench.expert_compute --tokens $((MICRO * SEQ)) --out "$OUT" ;;
    none) stage none python3 -m moetrain.bench.offload_step --tier none $bench_args ;;
    cpu) stage cpu python3 -m moetrain.bench.offload_step --tier cpu $bench_args ;;
    cpu_auto) stage cpu_auto python3 -m moetrain.bench.offload_step --tier cpu --step-on auto $bench_args ;;
    zero_offload) stage zero_offload python3 .dev/anchors/baseline_peers.py --method zero_offload \
        --layers "$LAYERS" --micro "$MICRO" --seq "$SEQ" --accum "$ACCUM" --steps "$STEPS" ;;
    *) echo "unknown stage $s" ;;
  esac
done
grep -h '^RESULT' "$OUT"/*.log > "$OUT/results.jsonl" 2>/dev/null || true
echo "results: $OUT/results.jsonl"; cat "$OUT/results.jsonl"

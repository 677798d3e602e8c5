# GPU run r45 (tree: 8f00d9d + the fused rotary kernel and the tokens-major varlen attention): every GPU test once;
# compute-only Qwen3-30B-A3B at the recipe's 8 x 4096 with activation checkpointing (fused RMSNorm and rotary);
# the Qwen3-30B-A3B recipe as written, 6 steps, from a random directory of its shape (r44: 2.909 s, mfu 0.229)
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,utilization.gpu,memory.used --format=csv,noheader -lms 1000 > $OUT/smi.csv 2>&1 &
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
summ() {
python3 - "$1" "$2" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("RESULT "): continue
    d = json.loads(line[7:]); o = d.get("offload", {})
    keep = {k: d.get(k) for k in ("step_s", "mfu", "plan_step_s", "paged_gib_per_step", "host_peak_gib", "plan_host_gib", "gpu_peak_used_gib", "plan_gpu_gib", "startup_s", "rc")}
    keep["hot_cache_slots"] = o.get("offload/hot_cache_slots")
    print("SUMMARY " + json.dumps(keep))
import glob
for path in glob.glob(sys.argv[2] + "/**/metrics.jsonl", recursive=True):
    for line in open(path):
        r = json.loads(line)
        print("TIME", r["step"], {k: round(v, 3) for k, v in r.items() if k.startswith("time/") or k.startswith("host/gc") or k in ("offload/step_host_s", "offload/step_s", "mfu", "offload/h2d_bytes")})
PY
}
log "GPU tests: all of tests/gpu"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/gpu > $OUT/tests.log 2>&1
grep -E "passed|failed|FAILED|ERROR" $OUT/tests.log | tail -12 >> $OUT/bench.log
log "compute-only qwen3-30b-a3b 8 x 4096, checkpointing"
timeout 120 python3 -m moetrain.bench.compute_only --recipe recipes/qwen3-30b-a3b.yaml --micro-batches 3 > $OUT/compute_q8.log 2>&1
grep '^RESULT' $OUT/compute_q8.log | cut -c1-400 >> $OUT/bench.log || tail -3 $OUT/compute_q8.log | cut -c1-400 >> $OUT/bench.log
log "fit qwen3-30b-a3b as written, 6 steps"
timeout 280 python3 -m moetrain.bench.recipe_run --recipe recipes/qwen3-30b-a3b.yaml --steps 6 --timeout 270 --workdir /tmp/front-q --out /tmp/json > $OUT/fit_qwen3.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_qwen3.log /tmp/front-q >> $OUT/bench.log
free -g >> $OUT/bench.log; df -h /tmp >> $OUT/bench.log
log done
cat $OUT/bench.log

# GPU run r35 (working tree): the kernel at 256 elements / 2 warps (r33) and hot records that keep their place
# (slots.HOT_STAY). The full-depth offload_step harness with thirds, traced; compute-only of DeepSeek-MoE-16B at
# 4 x 2048 (8 micro-batches); then fits of the recipe with master bf16_sr, 5 steps, halves (the default) and thirds
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
summ() {
python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("RESULT "): continue
    d = json.loads(line[7:]); o = d.get("offload", {})
    keep = {k: d.get(k) for k in ("step_s", "mfu", "paged_gib_per_step", "host_peak_gib", "gpu_peak_used_gib", "rc")}
    b = d.get("by_step", {})
    keep["elapsed_s"] = b.get("elapsed_s"); keep["offload_step_s"] = b.get("offload/step_s")
    keep["hot_cache_slots"] = o.get("offload/hot_cache_slots")
    print("SUMMARY " + json.dumps(keep))
PY
}
OS="python3 -m moetrain.bench.offload_step --full-depth --tier cpu --master bf16_sr --moments int8 --micro 4 --seq 2048 --accum 2 --max-grad-norm 1.0 --hot-cache-gb -1 --gpu-budget-gb 1"
log "offload_step full depth, thirds, traced"
MOETRAIN_STEP_CHUNKS=3 timeout 150 $OS --steps 5 --profile --out $OUT/traced > $OUT/traced.log 2>&1
grep -E '^RESULT' $OUT/traced.log | cut -c1-1500 >> $OUT/bench.log
log "compute-only 4 x 2048, 8 micro-batches"
timeout 90 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro 4 --micro-batches 8 --out /tmp/json > $OUT/compute4.log 2>&1
grep '^RESULT' $OUT/compute4.log | tail -1 | cut -c1-600 >> $OUT/bench.log
for c in 2 3; do
  log "fit bf16_sr, MOETRAIN_STEP_CHUNKS=$c, 5 steps"
  MOETRAIN_STEP_CHUNKS=$c timeout 170 python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 5 --timeout 160 --out /tmp/json \
      --model.offload.state.master=bf16_sr > $OUT/fit_chunks_$c.log 2>&1
  pkill -f "moetrain.cli fit" ; sleep 1
  summ $OUT/fit_chunks_$c.log >> $OUT/bench.log
done
log done
cat $OUT/bench.log

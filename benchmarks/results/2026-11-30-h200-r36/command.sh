# GPU run r36 (working tree): thirds by default, the kernel at 256 elements / 2 warps, hot records that keep their
# place. GPU tests of the weight masters, the hot cache and compression without NVMe; compute-only of DeepSeek-MoE-16B
# at 4 x 2048 (8 micro-batches); then two fits of the recipe with master bf16_sr, 5 steps each (the spread between
# runs), as the default runs them
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
log "GPU tests: weight masters, hot cache, compression without NVMe"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_weight_masters_cuda.py tests/gpu/test_hot_cache_cap_cuda.py tests/gpu/test_compression_cuda.py -k "not nvme" > $OUT/tests.log 2>&1
tail -3 $OUT/tests.log >> $OUT/bench.log
log "compute-only 4 x 2048, 8 micro-batches"
timeout 90 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro 4 --micro-batches 8 --out /tmp/json > $OUT/compute4.log 2>&1
grep '^RESULT' $OUT/compute4.log | tail -1 | cut -c1-600 >> $OUT/bench.log
for run in a b; do
  log "fit bf16_sr, run $run, 5 steps"
  timeout 150 python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 5 --timeout 140 --out /tmp/json \
      --model.offload.state.master=bf16_sr > $OUT/fit_$run.log 2>&1
  pkill -f "moetrain.cli fit" ; sleep 1
  summ $OUT/fit_$run.log >> $OUT/bench.log
done
log done
cat $OUT/bench.log

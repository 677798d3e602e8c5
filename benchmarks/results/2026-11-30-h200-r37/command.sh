# GPU run r37 (working tree): where the fit's step goes (metrics' time/forward_backward_s, time/optimizer_s,
# time/between_steps_s), with the defaults of r36. The step timer's GPU test; compute-only of DeepSeek-MoE-16B at
# 4 x 2048 (8 micro-batches); the recipe with master bf16_sr, then the recipe as written (fp32_split), 5 steps each
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
summ() {
python3 - "$1" "$2" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("RESULT "): continue
    d = json.loads(line[7:]); o = d.get("offload", {})
    keep = {k: d.get(k) for k in ("step_s", "mfu", "plan_step_s", "paged_gib_per_step", "host_peak_gib", "plan_host_gib", "gpu_peak_used_gib", "rc")}
    b = d.get("by_step", {})
    keep["elapsed_s"] = b.get("elapsed_s"); keep["offload_step_s"] = b.get("offload/step_s")
    keep["hot_cache_slots"] = o.get("offload/hot_cache_slots")
    print("SUMMARY " + json.dumps(keep))
import glob
for path in glob.glob(sys.argv[2] + "/**/metrics.jsonl", recursive=True):
    for line in open(path):
        r = json.loads(line)
        print("TIME", r["step"], {k: round(v, 3) for k, v in r.items() if k.startswith("time/")})
PY
}
log "GPU test: step timer"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_step_timing_cuda.py > $OUT/tests.log 2>&1
tail -2 $OUT/tests.log >> $OUT/bench.log
log "compute-only 4 x 2048, 8 micro-batches"
timeout 90 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro 4 --micro-batches 8 --out /tmp/json > $OUT/compute4.log 2>&1
grep '^RESULT' $OUT/compute4.log | tail -1 | cut -c1-600 >> $OUT/bench.log
log "fit bf16_sr, 5 steps"
timeout 140 python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 5 --timeout 130 --workdir /tmp/front-a --out /tmp/json \
    --model.offload.state.master=bf16_sr > $OUT/fit_bf16_sr.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_bf16_sr.log /tmp/front-a >> $OUT/bench.log
log "fit as written (fp32_split), 5 steps"
timeout 140 python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 5 --timeout 130 --workdir /tmp/front-b --out /tmp/json > $OUT/fit_as_written.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_as_written.log /tmp/front-b >> $OUT/bench.log
log done
cat $OUT/bench.log

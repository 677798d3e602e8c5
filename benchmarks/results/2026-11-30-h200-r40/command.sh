# GPU run r40 (tree at d8fa9e0): the front door after r39's change, as written too. The GPU test of a fit on the GPU
# (pinned batches through Lightning); compute-only of DeepSeek-MoE-16B at 4 x 2048 (24 micro-batches back to back);
# the recipe as written (fp32_split), 8 steps; the recipe with master bf16_sr, 8 steps; the SM clock, power and
# temperature every 250 ms
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_event_reasons.active \
    --format=csv,noheader -lms 250 > $OUT/smi.csv 2>&1 &
SMI=$!
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
    keep["step_host_s"] = b.get("offload/step_host_s"); keep["hot_cache_slots"] = o.get("offload/hot_cache_slots")
    print("SUMMARY " + json.dumps(keep))
import glob
for path in glob.glob(sys.argv[2] + "/**/metrics.jsonl", recursive=True):
    for line in open(path):
        r = json.loads(line)
        print("TIME", r["step"], {k: round(v, 3) for k, v in r.items() if k.startswith("time/") or k.startswith("host/gc") or k in ("offload/step_host_s", "offload/step_s")})
PY
}
compute() {
timeout 120 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro 4 --micro-batches 24 "${@:2}" > $OUT/compute_$1.log 2>&1
python3 -c "
import json, sys
for l in open(sys.argv[1]):
    if l.startswith('RESULT '):
        d = json.loads(l[7:]); d.pop('profile_2_micro_batches', None); print('RESULT', json.dumps(d))
" $OUT/compute_$1.log >> $OUT/bench.log
}
log "GPU test: a fit on the GPU"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_teardown_cuda.py > $OUT/tests.log 2>&1
tail -2 $OUT/tests.log >> $OUT/bench.log
log "compute-only 4 x 2048, 24 micro-batches"
compute a --out /tmp/json
log "fit as written (fp32_split), 8 steps"
timeout 220 python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 8 --timeout 210 --workdir /tmp/front-w --out /tmp/json > $OUT/fit_as_written.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_as_written.log /tmp/front-w >> $OUT/bench.log
log "fit bf16_sr, 8 steps"
timeout 200 python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 8 --timeout 190 --workdir /tmp/front-a --out /tmp/json \
    --model.offload.state.master=bf16_sr > $OUT/fit_bf16_sr.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_bf16_sr.log /tmp/front-a >> $OUT/bench.log
kill $SMI
log done
cat $OUT/bench.log

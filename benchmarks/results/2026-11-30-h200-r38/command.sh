# GPU run r38 (working tree at bb10da4 + the profile comparison): where the fit's forward and backward spend more than
# compute-only's. GPU tests of the fused step and the hot cache (the swapper's host-side changes of bb10da4);
# compute-only of DeepSeek-MoE-16B at 4 x 2048 (24 micro-batches, each timed, two traced); the recipe with master
# bf16_sr, 6 steps, step 6's micro-batches traced; compute-only again (a card that has run for minutes);
# the SM clock, power and temperature sampled every 250 ms throughout
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
        print("TIME", r["step"], {k: round(v, 3) for k, v in r.items() if k.startswith("time/") or k in ("offload/step_host_s", "offload/step_s")})
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
log "GPU tests: fused step, hot cache"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_step_cuda.py tests/gpu/test_hot_cache_cap_cuda.py > $OUT/tests.log 2>&1
tail -2 $OUT/tests.log >> $OUT/bench.log
log "compute-only 4 x 2048, 24 micro-batches, 2 traced"
compute a --profile --out /tmp/json
cp /tmp/json/compute_only_deepseek-moe-16b.json $OUT/compute_only_profile.json
log "fit bf16_sr, 6 steps, step 6 traced (2 micro-batches)"
timeout 170 python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 6 --timeout 160 --workdir /tmp/front-a --out /tmp/json \
    --model.offload.state.master=bf16_sr --profile.step=6 --profile.micro_batches=2 > $OUT/fit_bf16_sr.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_bf16_sr.log /tmp/front-a >> $OUT/bench.log
PROF=$(find /tmp/front-a -name profile_step_6.json | head -1)
[ -n "$PROF" ] && cp "$PROF" $OUT/fit_profile_step_6.json && \
    python3 -m moetrain.bench.compare_profiles "$PROF" $OUT/compute_only_profile.json --top 40 >> $OUT/bench.log 2>&1
log "compute-only again, 24 micro-batches"
compute b --out /tmp/json2
kill $SMI
log done
cat $OUT/bench.log

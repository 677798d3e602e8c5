# GPU run r28 (tree 0336113): the front door with the CPU share's exact AdamW (the recipe's step_on auto): compute-only of DeepSeek-MoE-16B at 4 x 2048 on the fit's packed rows, a fit of the recipe with master bf16_sr (5 steps), then all of tests/gpu
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x $f /tmp/aio; done
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt; lscpu | grep -i "model name\|flags" | cut -c1-400 >> $OUT/env.txt
( python3 -m moetrain.offload.ops > /tmp/ops.log 2>&1; echo built > /tmp/ops.done ) &  # cpu_adam for the fit, async_io for the tests
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
summ() {  # the RESULT line's figures that matter, whole (the line itself is long)
python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("RESULT "): continue
    d = json.loads(line[7:]); o = d.get("offload", {})
    keep = {k: v for k, v in d.items() if not isinstance(v, (dict, list)) or k in ("by_step", "overrides")}
    keep["offload_step_s"] = o.get("offload/step_s"); keep["hot_cache_slots"] = o.get("offload/hot_cache_slots")
    keep["auto_on_gpu"] = o.get("offload/auto_on_gpu"); keep["experts_stepped_cpu"] = o.get("offload/experts_stepped_cpu")
    keep.pop("profile_2_micro_batches", None)
    print("SUMMARY " + json.dumps(keep))
PY
}
log "compute-only 4 x 2048, 8 micro-batches (first: nothing else on the host but the op build)"
timeout 90 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro 4 --micro-batches 8 --out /tmp/json > $OUT/compute4.log 2>&1
grep '^RESULT' $OUT/compute4.log | tail -1 | cut -c1-2500 >> $OUT/bench.log
log "waiting for the op build"
while [ ! -f /tmp/ops.done ]; do sleep 2; done
log "ops built"; tail -2 /tmp/ops.log >> $OUT/bench.log
log "fit bf16_sr 4 x 2048 x 16, 5 steps (limit 190)"
python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 5 --timeout 190 --out /tmp/json \
    --model.offload.state.master=bf16_sr > $OUT/fit_bf16sr.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_bf16sr.log >> $OUT/bench.log
left=$((540 - (SECONDS - T0)))
log "tests/gpu (limit $left)"
timeout $left python3 -m pytest -q -p no:cacheprovider -rfs tests/gpu > $OUT/tests.log 2>&1
tail -6 $OUT/tests.log >> $OUT/bench.log
log done
grep -v '^{' $OUT/bench.log | cut -c1-3000

# GPU run r19: the trace r18 lost: compute-only traced (2 micro-batches) beside a traced fit of DeepSeek-MoE-16B with master bf16_sr (step 4 of 6, 2 micro-batches) at 4 x 2048 x 16; GPU tests of the multi-record fused step, weight masters and the fp32_split store fill
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x $f /tmp/aio; done
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt; python3 -c "import triton; print('triton', triton.__version__)" >> $OUT/env.txt 2>&1
( python3 -m moetrain.offload.ops > /tmp/ops.log 2>&1; echo built > /tmp/ops.done ) &
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
summ() {  # the RESULT line's figures that matter, whole (the line itself is long)
python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("RESULT "): continue
    d = json.loads(line[7:]); o = d.get("offload", {})
    keep = {k: v for k, v in d.items() if not isinstance(v, (dict, list)) or k in ("by_step", "overrides")}
    keep["offload_step_s"] = o.get("offload/step_s"); keep["hot_cache_slots"] = o.get("offload/hot_cache_slots")
    keep.pop("profile_2_micro_batches", None)
    print("SUMMARY " + json.dumps(keep))
PY
}
log "compute-only 4 x 2048, 8 micro-batches (first: nothing else on the host)"
timeout 100 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro 4 --micro-batches 8 --profile --out /tmp/json > $OUT/compute4.log 2>&1
grep '^RESULT' $OUT/compute4.log | tail -1 | cut -c1-900 >> $OUT/bench.log
log tests
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfs tests/gpu/test_fused_step_cuda.py tests/gpu/test_store_fill_cuda.py tests/gpu/test_weight_masters_cuda.py > $OUT/tests.log 2>&1
tail -4 $OUT/tests.log >> $OUT/bench.log
log "waiting for the op build"
while [ ! -f /tmp/ops.done ]; do sleep 2; done
log "ops built"; tail -3 /tmp/ops.log >> $OUT/bench.log
tar -czf $OUT/ops.tgz -C /tmp ops 2>/dev/null; ls -la $OUT/ops.tgz >> $OUT/bench.log
for v in "bf16_sr bf16sr_prof"; do
  set -- $v
  left=$((560 - (SECONDS - T0)))
  log "fit $1 4 x 2048 x 16 ($2; limit $left)"
  [ $left -gt 60 ] && python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 6 --timeout $(( left < 260 ? left : 260 )) --out /tmp/json \
    --model.offload.state.master=$1 --profile.step=4 --profile.micro_batches=2 > $OUT/fit_$2.log 2>&1
  pkill -f "moetrain.cli fit" ; sleep 1
  summ $OUT/fit_$2.log >> $OUT/bench.log
  grep -v '^RESULT' $OUT/fit_$2.log | tail -4 >> $OUT/bench.log
done
log done
grep -v '^{' $OUT/bench.log | cut -c1-3000

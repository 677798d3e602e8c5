# GPU run r20: packed documents through varlen flash attention, the fused SwiGLU activation and MoE combine kernels (compute-only now on the fit's own packed rows): compute-only of DeepSeek-MoE-16B at 4 x 2048 with them on and off (traced); their GPU tests and the fused-step ones; a fit of the recipe with master bf16_sr, 5 steps, step 5 traced (idle gaps named); then the recipe as written if time is left
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
log "compute-only 4 x 2048, 8 micro-batches, fused kernels on (first: nothing else on the host)"
timeout 100 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro 4 --micro-batches 8 --profile --out /tmp/json > $OUT/compute4.log 2>&1
grep '^RESULT' $OUT/compute4.log | tail -1 | cut -c1-2500 >> $OUT/bench.log
log "compute-only, random tokens (one causal document a row: the baseline r19 measured), 6 micro-batches"
timeout 100 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro 4 --micro-batches 6 --random-tokens --out /tmp/json > $OUT/compute4_random.log 2>&1
grep '^RESULT' $OUT/compute4_random.log | tail -1 | cut -c1-2500 >> $OUT/bench.log
log tests
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfs tests/gpu/test_varlen_cuda.py tests/gpu/test_fused_step_cuda.py -k "flash or dense or model_loss or engine_fused or records_of_one" > $OUT/tests.log 2>&1
tail -4 $OUT/tests.log >> $OUT/bench.log
log "waiting for the op build"
while [ ! -f /tmp/ops.done ]; do sleep 2; done
log "ops built"; tail -2 /tmp/ops.log >> $OUT/bench.log
for v in "bf16_sr bf16sr_prof5 --profile.step=5"; do
  set -- $v
  left=$((470 - (SECONDS - T0)))
  log "fit $1 4 x 2048 x 16 ($2; limit $left)"
  [ $left -gt 100 ] && python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 5 --timeout $(( left < 250 ? left : 250 )) --out /tmp/json \
    --model.offload.state.master=$1 ${3:-} --profile.micro_batches=2 > $OUT/fit_$2.log 2>&1
  pkill -f "moetrain.cli fit" ; sleep 1
  summ $OUT/fit_$2.log >> $OUT/bench.log
done
log done
grep -v '^{' $OUT/bench.log | cut -c1-3000

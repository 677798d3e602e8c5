# GPU run r8: the bf16 residual stream; DeepSeek-MoE-16B bf16_sr fits at 2 x 2048 x 32 and 4 x 2048 x 16 beside compute-only at both
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x $f /tmp/aio; done
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt; python3 -c "import triton; print('triton', triton.__version__)" >> $OUT/env.txt 2>&1
( python3 -m moetrain.offload.ops > /tmp/ops.log 2>&1 ) &
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
log tests
timeout 130 python3 -m pytest -q -p no:cacheprovider -rfs tests/gpu/test_offload_cuda.py tests/gpu/test_experts_cuda.py tests/gpu/test_teardown_cuda.py > $OUT/tests.log 2>&1
tail -8 $OUT/tests.log >> $OUT/bench.log
for v in "2 32" "4 16"; do
  set -- $v
  log "fit bf16_sr micro $1 accum $2"
  python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 4 --timeout 170 --out /tmp/json \
    --model.offload.state.master=bf16_sr --data.micro_batch_size=$1 --model.accumulate_grad_batches=$2 > $OUT/fit_m$1.log 2>&1
  pkill -f "moetrain.cli fit" ; sleep 1
  summ $OUT/fit_m$1.log >> $OUT/bench.log
  grep -v '^RESULT' $OUT/fit_m$1.log | tail -5 >> $OUT/bench.log
  python3 -c "import json; d=json.load(open('/tmp/json/recipe_deepseek-moe-16b.json')); print('\n'.join(d.get('log_tail', [])))" > $OUT/fit_m$1_tail.log 2>&1
done
rm -rf /tmp/moetrain-models/*
log "compute micro 2"
timeout 80 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro-batches 6 --out /tmp/json > $OUT/compute.log 2>&1
grep '^RESULT' $OUT/compute.log | tail -1 | cut -c1-900 >> $OUT/bench.log
log "compute micro 4"
timeout 80 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro 4 --micro-batches 4 --out /tmp/json > $OUT/compute4.log 2>&1
grep '^RESULT' $OUT/compute4.log | tail -1 | cut -c1-900 >> $OUT/bench.log
log done
grep -v '^{' $OUT/bench.log | cut -c1-2500

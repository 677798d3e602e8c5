# GPU run r9 (tree without the bf16 residual stream): DeepSeek-MoE-16B at 4 x 2048 x 16, bf16_sr and as written (fp32 master); the engine-vs-resident GPU test
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
timeout 60 python3 -m pytest -q -p no:cacheprovider -rfs "tests/gpu/test_offload_cuda.py::test_dense_equals_resident_adamw_grouped_experts" > $OUT/tests.log 2>&1
tail -3 $OUT/tests.log >> $OUT/bench.log
for v in "bf16_sr 95" "fp32 130"; do
  set -- $v
  left=$((400 - (SECONDS - T0)))
  log "fit master $1 micro 4 accum 16 (limit $left)"
  [ $left -gt 60 ] && python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 4 --timeout $(( left < $2 ? left : $2 )) --out /tmp/json \
    --model.offload.state.master=$1 --data.micro_batch_size=4 --model.accumulate_grad_batches=16 > $OUT/fit_$1.log 2>&1
  pkill -f "moetrain.cli fit" ; sleep 1
  summ $OUT/fit_$1.log >> $OUT/bench.log
done
log done
grep -v '^{' $OUT/bench.log | cut -c1-2500

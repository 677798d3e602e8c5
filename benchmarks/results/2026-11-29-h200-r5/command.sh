# GPU run r5: fused compressed-state step (tests, bench); DeepSeek-MoE-16B bf16_sr fit + compute-only; OLMoE on a 79 GiB cap
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev .dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x $f /tmp/aio; done
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt; python3 -c "import triton; print('triton', triton.__version__)" >> $OUT/env.txt 2>&1
( python3 -m moetrain.offload.ops > /tmp/ops.log 2>&1 ) &
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
log tests
timeout 100 python3 -m pytest -q -p no:cacheprovider -rfs tests/gpu/test_fused_step_cuda.py tests/gpu/test_teardown_cuda.py tests/gpu/test_pinned_register_cuda.py > $OUT/tests.log 2>&1
tail -6 $OUT/tests.log >> $OUT/bench.log
log fused_bench
timeout 60 python3 -m moetrain.bench.fused_step --records 64 > $OUT/fused.log 2>&1
tail -3 $OUT/fused.log >> $OUT/bench.log
log "recipe bf16_sr"
python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 4 --timeout 240 --out /tmp/json --model.offload.state.master=bf16_sr > $OUT/recipe.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
python3 - deepseek-moe-16b > $OUT/timeline.txt <<'PY'
import json, sys; d = json.load(open(f"/tmp/json/recipe_{sys.argv[1]}.json"))
for r in d.get("host_timeline", [])[::3]: print(json.dumps(r))
print("\n".join(d.get("log_tail", [])))
PY
grep '^RESULT' $OUT/recipe.log | cut -c1-3000 >> $OUT/bench.log
rm -rf /tmp/moetrain-models/*
log compute
timeout 90 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro-batches 6 --out /tmp/json > $OUT/compute.log 2>&1
grep '^RESULT' $OUT/compute.log | tail -1 | cut -c1-900 >> $OUT/bench.log
left=$((390 - (SECONDS - T0)))
log "olmoe recipe79 (limit $left s)"
[ $left -gt 60 ] && python3 -m moetrain.bench.recipe_run --recipe recipes/olmoe-1b-7b.yaml --steps 3 --gpu-gib 79 --timeout $left --out /tmp/json > $OUT/recipe_olmoe.log 2>&1
pkill -f "moetrain.cli fit"
grep '^RESULT' $OUT/recipe_olmoe.log | cut -c1-3000 >> $OUT/bench.log
tail -5 /tmp/json/recipe_olmoe-1b-7b.log > $OUT/olmoe_tail.log 2>/dev/null
log done
grep -v '^{' $OUT/bench.log | cut -c1-1800

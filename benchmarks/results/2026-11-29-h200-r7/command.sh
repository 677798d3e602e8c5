# GPU run r7: fused-step GPU tests; DeepSeek-MoE-16B bf16_sr fit traced at step 4 beside compute-only (micro 2, traced; micro 4)
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
df -h /tmp >> $OUT/env.txt
log tests
timeout 100 python3 -m pytest -q -p no:cacheprovider -rfs tests/gpu/test_fused_step_cuda.py > $OUT/tests.log 2>&1
tail -8 $OUT/tests.log >> $OUT/bench.log
log "recipe bf16_sr, profile step 4"
python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 4 --timeout 240 --out /tmp/json \
  --model.offload.state.master=bf16_sr --profile.step=4 --profile.trace=true > $OUT/recipe.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
grep '^RESULT' $OUT/recipe.log | cut -c1-2500 >> $OUT/bench.log
cp /tmp/json/recipe_deepseek-moe-16b.json $OUT/ 2>/dev/null
for f in /tmp/moetrain-front/deepseek-moe-16b/runs/*/profile_step_4.trace.json; do gzip -c "$f" > $OUT/fit_trace.json.gz; done
ls -la /tmp/moetrain-front/deepseek-moe-16b/runs/*/ >> $OUT/bench.log 2>&1
rm -rf /tmp/moetrain-models/*
log "compute micro 2"
timeout 100 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro-batches 6 --profile --out /tmp/json > $OUT/compute.log 2>&1
grep '^RESULT' $OUT/compute.log | tail -1 | cut -c1-1500 >> $OUT/bench.log
log "compute micro 4"
timeout 100 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro 4 --micro-batches 4 --out /tmp/json > $OUT/compute4.log 2>&1
grep '^RESULT' $OUT/compute4.log | tail -1 | cut -c1-900 >> $OUT/bench.log
log done
grep -v '^{' $OUT/bench.log | cut -c1-1500

# GPU run r6: fused-step GPU tests; ESFT top_p 0.2 against full fine-tuning (DeepSeek-MoE-16B); DeepSeek-V2-Lite as written
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
log tests
timeout 90 python3 -m pytest -q -p no:cacheprovider -rfs tests/gpu/test_fused_step_cuda.py > $OUT/tests.log 2>&1
tail -8 $OUT/tests.log >> $OUT/bench.log
log esft
python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b-esft.yaml --compare-full --steps 3 --timeout 170 \
  --top-p 0.2 --select-tokens 16384 --out /tmp/json --model.accumulate_grad_batches=16 > $OUT/esft.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
grep '^RESULT' $OUT/esft.log | cut -c1-3500 >> $OUT/bench.log
for f in /tmp/json/recipe_deepseek-moe-16b-esft*.log; do echo "--- $f"; grep -v '^\s*$' $f | tail -4; done >> $OUT/esft_tails.log 2>&1
rm -rf /tmp/moetrain-models/*
left=$((545 - (SECONDS - T0)))
log "v2-lite (limit $left s)"
[ $left -gt 90 ] && python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-v2-lite.yaml --steps 3 --timeout $((left - 45)) --out /tmp/json > $OUT/recipe_v2.log 2>&1
pkill -f "moetrain.cli fit"
grep '^RESULT' $OUT/recipe_v2.log | cut -c1-3000 >> $OUT/bench.log
tail -30 /tmp/json/recipe_deepseek-v2-lite.log > $OUT/v2_tail.log 2>/dev/null
log done
grep -v '^{' $OUT/bench.log | cut -c1-1800

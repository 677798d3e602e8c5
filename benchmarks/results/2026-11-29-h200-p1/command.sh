# GPU run p1: compute-only DeepSeek-MoE-16B (1x2048, 2x2048), GPU tests, 4-layer gpu vs auto, the recipe fit at 2x2048 with a profile
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x $f /tmp/aio; done
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt; nproc >> $OUT/env.txt; free -g >> $OUT/env.txt
( python3 -m moetrain.offload.ops > $OUT/ops.log 2>&1 ) &
OPS=$!
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
for a in "--micro 1" "--micro 2"; do
  log "compute $a"
  timeout 120 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --profile --micro-batches 6 $a --out $OUT/json >> $OUT/compute.log 2>&1
  grep '^RESULT' $OUT/compute.log | tail -1 >> $OUT/bench.log
done
wait $OPS
log tests
timeout 200 python3 -m pytest -q tests/gpu -p no:cacheprovider -rf -x -k "not paged_inference" > $OUT/tests.log 2>&1
tail -6 $OUT/tests.log >> $OUT/bench.log
B="--layers 4 --micro 4 --seq 2048 --accum 4 --steps 5"
for v in "gpu" "auto" "auto8"; do
  log "4layer $v"
  case $v in gpu) a="--step-on gpu"; e="";; auto) a="--step-on auto"; e="";; auto8) a="--step-on auto"; e="OMP_NUM_THREADS=8";; esac
  env $e timeout 90 python3 -m moetrain.bench.offload_step --tier cpu $a $B > $OUT/l4-$v.log 2>&1
  grep '^RESULT' $OUT/l4-$v.log | sed "s/^RESULT /RESULT {\"v\": \"$v\"} /" >> $OUT/bench.log
done
log recipe
OUT=$OUT RECIPE_STEPS=3 RECIPE_TIMEOUT=330 RECIPE_ARGS="--data.micro_batch_size=2 --model.accumulate_grad_batches=32 --profile.step=2" bash scripts/gpu_bench.sh recipe:deepseek-moe-16b > $OUT/recipe.log 2>&1
grep '^RESULT' $OUT/recipe.log | cut -c1-3000 >> $OUT/bench.log
log done
cut -c1-1500 $OUT/bench.log

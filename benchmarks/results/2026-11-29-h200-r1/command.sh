# GPU run r1: host-memory growth bisect (6 layers, full width) with the smaps sampler
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev .dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x $f /tmp/aio; done
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt; free -g >> $OUT/env.txt; nproc >> $OUT/env.txt
( python3 -m moetrain.offload.ops > /tmp/ops.log 2>&1 ) &
OPS=$!
export VARIANT_TIMEOUT=110
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
log gpu
BISECT_VARIANTS="step_on_gpu malloc_fixed_gpu" bash scripts/bisect_host_growth.sh 6 8 >> $OUT/bench.log 2>&1
log wait_ops; wait $OPS; tail -3 /tmp/ops.log >> $OUT/bench.log
log auto
BISECT_VARIANTS="as_written malloc_fixed" bash scripts/bisect_host_growth.sh 6 8 >> $OUT/bench.log 2>&1
left=$((570 - (SECONDS - T0)))
if [ $left -gt 100 ]; then log no_hot_cache; VARIANT_TIMEOUT=$((left - 10)) BISECT_VARIANTS="no_hot_cache" bash scripts/bisect_host_growth.sh 6 8 >> $OUT/bench.log 2>&1; fi
pkill -f "moetrain.cli fit"
for f in /tmp/moetrain-bisect-*.log; do echo "--- $f"; grep -v "^\s*$" $f | tail -15; done > $OUT/fit_tails.log 2>&1
log done
grep -v "^RESULT\|^SAMPLER" $OUT/bench.log | cut -c1-300

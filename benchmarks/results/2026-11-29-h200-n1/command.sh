# The command of run n1. The two trees were packed first, in the checkout, with
#   git archive --format=tar -o .dev/old.tar e2a46c2 && git archive --format=tar -o .dev/new.tar e0e2131
# and .dev (with the wheels and libaio debs of the GPU machine) carried to it; then: bash .dev/final.sh
# The closing GPU command: the 4-layer offload step before (e2a46c2) and after the engine's split, interleaved,
# then the GPU tests of the new tree, then paged generation. Everything under $OUT.
set -u
T0=$SECONDS
for t in new old; do mkdir -p /tmp/$t && tar -xf .dev/$t.tar -C /tmp/$t; done
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl 2>/dev/null || exit 1
mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x $f /tmp/aio; done
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_EXTENSIONS_DIR=/tmp/ops
(cd /tmp/new && PYTHONPATH=/tmp/site:/tmp/new python3 -m moetrain.offload.ops > $OUT/ops.log 2>&1) &
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
B="--layers 4 --micro 4 --seq 2048 --accum 4 --steps ${STEPS:-5} --out $OUT/json"
bench() {  # bench TREE NAME ARGS...
  local tree=$1 name=$2; shift 2
  echo "=== $tree $name ($((SECONDS - T0)) s)" >> $OUT/bench.log
  (cd /tmp/$tree && PYTHONPATH=/tmp/site:/tmp/$tree timeout 90 python3 -m moetrain.bench.offload_step "$@" $B) \
    > $OUT/$tree-$name.log 2>&1
  grep '^RESULT' $OUT/$tree-$name.log | sed "s/^RESULT /RESULT {\"tree\": \"$tree\", \"name\": \"$name\"} /" >> $OUT/bench.log
}
for name in none cpu cpu_bf16_hot; do
  case $name in none) a="--tier none";; cpu) a="--tier cpu";; cpu_bf16_hot) a="--tier cpu --moments bf16 --hot-cache-gb -1";; esac
  for tree in old new; do bench $tree $name $a; done
done
wait  # the ops build (cpu_adam) for step_on auto
bench new cpu_auto --tier cpu --step-on auto
echo "=== tests ($((SECONDS - T0)) s)" >> $OUT/bench.log
(cd /tmp/new && PYTHONPATH=/tmp/site:/tmp/new timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q tests/gpu -p no:cacheprovider -rf) > $OUT/tests.log 2>&1
tail -5 $OUT/tests.log >> $OUT/bench.log
echo "=== paged ($((SECONDS - T0)) s)" >> $OUT/bench.log
(cd /tmp/new && PYTHONPATH=/tmp/site:/tmp/new timeout ${PAGED_TIMEOUT:-150} python3 -m moetrain.cli bench paged_generate --preset mixtral-8x7b --layers 4 --make_dir /tmp/mixtral-4l --new_tokens 64 --out $OUT/paged-json) > $OUT/paged.log 2>&1
grep '^RESULT' $OUT/paged.log >> $OUT/bench.log
echo "=== done ($((SECONDS - T0)) s)" >> $OUT/bench.log
cat $OUT/bench.log | cut -c1-600

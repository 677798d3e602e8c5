# GPU run r3: recipes as written: deepseek-moe-16b (fp32 master + int8), qwen2-moe-a2.7b
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
for r in deepseek-moe-16b:4:290 qwen2-moe-a2.7b:3:0; do
  name=${r%%:*}; rest=${r#*:}; steps=${rest%%:*}; lim=${rest#*:}
  [ "$lim" = 0 ] && lim=$((575 - (SECONDS - T0)))
  [ $lim -lt 60 ] && break
  log "recipe $name as written (limit $lim s)"
  python3 -m moetrain.bench.recipe_run --recipe recipes/$name.yaml --steps $steps --timeout $lim --out /tmp/json > $OUT/recipe_$name.log 2>&1
  pkill -f "moetrain.cli fit"; sleep 1
  python3 - $name > $OUT/timeline_$name.txt <<'PY'
import json, sys; d = json.load(open(f"/tmp/json/recipe_{sys.argv[1]}.json"))
for r in d.get("host_timeline", [])[::3]: print(json.dumps(r))
print("\n".join(d.get("log_tail", [])))
PY
  grep '^RESULT' $OUT/recipe_$name.log | cut -c1-3000 >> $OUT/bench.log
  rm -rf /tmp/moetrain-models/*
done
log done
grep -v '^{' $OUT/bench.log | cut -c1-1800

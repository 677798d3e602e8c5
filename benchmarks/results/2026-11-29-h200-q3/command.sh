# GPU run q3: SDPA host-memory probe, compute-only, DeepSeek-MoE-16B fit (bf16_sr) with masked attention off cuDNN, paged generation, qwen2-moe recipe
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x $f /tmp/aio; done
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
( python3 -m moetrain.offload.ops > /tmp/ops.log 2>&1 ) &
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
log probe
timeout 120 python3 scripts/probe_sdpa_host_memory.py > $OUT/probe_sdpa.log 2>&1
grep '^RESULT' $OUT/probe_sdpa.log >> $OUT/bench.log
wait
log compute
timeout 100 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --profile --micro-batches 6 --out /tmp/json > $OUT/compute.log 2>&1
grep '^RESULT' $OUT/compute.log | tail -1 | cut -c1-900 >> $OUT/bench.log
log "recipe bf16_sr"
python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 3 --timeout 300 --out /tmp/json --model.offload.state.master=bf16_sr > $OUT/recipe.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 2
python3 - > $OUT/timeline.txt <<'PY'
import json; d = json.load(open("/tmp/json/recipe_deepseek-moe-16b.json"))
for r in d.get("host_timeline", []): print(json.dumps(r))
print("\n".join(d.get("log_tail", [])))
PY
grep '^RESULT' $OUT/recipe.log | cut -c1-2000 >> $OUT/bench.log
rm -rf /tmp/moetrain-models/deepseek-moe-16b
log paged
timeout 120 python3 -m moetrain.cli bench paged_generate --preset mixtral-8x7b --layers 4 --make_dir /tmp/mixtral-4l --new_tokens 64 --out /tmp/json > $OUT/paged.log 2>&1
grep '^RESULT' $OUT/paged.log | cut -c1-3000 >> $OUT/bench.log
rm -rf /tmp/mixtral-4l
left=$((585 - (SECONDS - T0)))
log "recipe qwen2-moe-a2.7b (limit $left s)"
[ $left -gt 60 ] && python3 -m moetrain.bench.recipe_run --recipe recipes/qwen2-moe-a2.7b.yaml --steps 3 --timeout $((left - 12)) --out /tmp/json > $OUT/recipe_qwen2.log 2>&1
pkill -f "moetrain.cli fit"
python3 - > $OUT/timeline_qwen2.txt <<'PY'
import json; d = json.load(open("/tmp/json/recipe_qwen2-moe-a2.7b.json"))
for r in d.get("host_timeline", [])[-8:]: print(json.dumps(r))
print("\n".join(d.get("log_tail", [])))
PY
grep '^RESULT' $OUT/recipe_qwen2.log | cut -c1-2000 >> $OUT/bench.log
log done
cut -c1-1200 $OUT/bench.log

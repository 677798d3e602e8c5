# GPU run r11: where the optimizer step after backward goes (4 MoE layers of the DeepSeek-MoE-16B shape, bf16_sr + int8, clipping on, 1 GiB of slots, no hot cache): host profile of the step
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
for w in 1 0; do
  echo "=== MOETRAIN_MASTER_FROM_WEIGHTS=$w ($((SECONDS - T0)) s)" >> $OUT/bench.log
  MOETRAIN_MASTER_FROM_WEIGHTS=$w timeout 200 python3 -m moetrain.bench.offload_step --tier cpu --master bf16_sr --moments int8 --max-grad-norm 1.0 \
    --gpu-budget-gb 1 --hot-cache-gb 0 --layers 4 --micro 4 --accum 4 --steps 5 $([ $w = 1 ] && echo --cprofile) > $OUT/step_w$w.log 2>&1
  grep -v '^RESULT' $OUT/step_w$w.log | sed 's|/tmp/site/||g; s|/tmp/head/||g' | head -60 >> $OUT/bench.log
  grep '^RESULT' $OUT/step_w$w.log | python3 -c "import json,sys; d=json.loads(sys.stdin.read()[7:]); t=d['telemetry']; print({k: t.get(k) for k in ('offload/step_s','offload/step_host_s','offload/h2d_bytes','offload/d2h_bytes','offload/experts_stepped_gpu','offload/cache_hit_rate')}, d['step_times_s'])" >> $OUT/bench.log 2>&1
done
echo "=== done ($((SECONDS - T0)) s)" >> $OUT/bench.log
cat $OUT/bench.log

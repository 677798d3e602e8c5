# GPU run r4: pinning rate by method; paged generation (Mixtral-8x7B shape, 4 layers) with prefetch_when_busy first
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev .dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt; python3 -c "import triton; print('triton', triton.__version__)" >> $OUT/env.txt 2>&1
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
log pin_rate
timeout 120 python3 scripts/probe_pin_rate.py --gib 16 > $OUT/pin_rate.log 2>&1
grep -v "^RESULT" $OUT/pin_rate.log >> $OUT/bench.log; grep "^RESULT" $OUT/pin_rate.log >> $OUT/bench.log
log paged
timeout 200 python3 -m moetrain.cli bench paged_generate --preset mixtral-8x7b --layers 4 --make_dir /tmp/mixtral-4l --new_tokens 64 --expert_dtype auto --out /tmp/json > $OUT/paged.log 2>&1
grep '^RESULT' $OUT/paged.log | cut -c1-4000 >> $OUT/bench.log
log done
cut -c1-2500 $OUT/bench.log

# GPU run r47 (tree: 5d2e6b3): the last two recipes of the front door, as written, after the planner's
# recalibration: OLMoE-1B-7B from a random directory of its shape on the 80 GB card its header names (the H200
# capped to 79 GiB), and Mixtral-8x7B by random initialisation of its preset (its 87 GiB download does not fit
# this 64 GiB disk: --random-init), 4 steps each
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
summ() {
python3 - "$1" "$2" <<'PY'
import json, sys, glob
for line in open(sys.argv[1]):
    if line.startswith("RESULT "):
        d = json.loads(line[7:])
        print("SUMMARY", json.dumps({k: d.get(k) for k in ("step_s", "mfu", "plan_step_s", "host_peak_gib", "plan_host_gib", "gpu_peak_used_gib", "plan_gpu_gib", "startup_s", "rc")}))
for path in glob.glob(sys.argv[2] + "/**/metrics.jsonl", recursive=True):
    for line in open(path):
        r = json.loads(line)
        print("TIME", r["step"], {k: round(v, 3) for k, v in r.items() if k in ("time/forward_backward_s", "time/optimizer_s", "mfu", "offload/step_s", "time/micro_batch_median_s")})
PY
}
log "fit olmoe-1b-7b as written, GPU capped to 79 GiB, 4 steps"
timeout 230 python3 -m moetrain.bench.recipe_run --recipe recipes/olmoe-1b-7b.yaml --gpu-gib 79 --steps 4 --timeout 220 --workdir /tmp/front-olmoe --out /tmp/json > $OUT/fit_olmoe-1b-7b.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_olmoe-1b-7b.log /tmp/front-olmoe >> $OUT/bench.log
rm -rf /tmp/front-olmoe /tmp/moetrain-models
log "fit mixtral-8x7b as written, random initialisation, 4 steps"
timeout 340 python3 -m moetrain.bench.recipe_run --recipe recipes/mixtral-8x7b.yaml --random-init --steps 4 --timeout 330 --workdir /tmp/front-mixtral --out /tmp/json > $OUT/fit_mixtral-8x7b.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_mixtral-8x7b.log /tmp/front-mixtral >> $OUT/bench.log
log done
cat $OUT/bench.log

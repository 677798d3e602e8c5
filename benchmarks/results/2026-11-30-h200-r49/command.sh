# GPU run r49 (tree: r48's): where OLMoE-1B-7B's step goes. r47 measured 5.40 s a step on the H200 capped to
# 79 GiB against a plan of 3.72 s: here the recipe as written without the cap, 5 steps, with step 3's micro-batches
# traced (profile.step=3: kernel families, GPU idle share, host operators)
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
        print("TIME", r["step"], {k: round(v, 3) for k, v in r.items() if k in ("time/forward_backward_s", "time/optimizer_s", "mfu", "offload/step_s", "time/micro_batch_median_s", "offload/experts_stepped_cpu", "offload/step_host_s")})
PY
}
log "fit olmoe-1b-7b as written, uncapped, 5 steps, step 3 traced"
timeout 330 python3 -m moetrain.bench.recipe_run --recipe recipes/olmoe-1b-7b.yaml --steps 5 --timeout 320 --workdir /tmp/front-olmoe --out /tmp/json --profile.step=3 > $OUT/fit_olmoe-1b-7b.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_olmoe-1b-7b.log /tmp/front-olmoe >> $OUT/bench.log
find /tmp/front-olmoe -name 'profile_step_*.json' -exec cp {} $OUT/ \;
log done
cat $OUT/bench.log

# GPU run r48 (tree: r47's + a large random initialisation under an offload tier streamed into the store,
# random_into_tiers): the GPU tests of the build paths, then Mixtral-8x7B as written by random initialisation of its
# preset (r47: out of memory building the fp32 model on the GPU), 4 steps
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
log "gpu tests of the build paths"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fast_init_cuda.py tests/gpu/test_store_fill_cuda.py tests/gpu/test_paged_weights_cuda.py tests/gpu/test_teardown_cuda.py > $OUT/tests.log 2>&1
tail -3 $OUT/tests.log >> $OUT/bench.log
log "fit mixtral-8x7b as written, random initialisation, 4 steps"
timeout 400 python3 -m moetrain.bench.recipe_run --recipe recipes/mixtral-8x7b.yaml --random-init --steps 4 --timeout 390 --workdir /tmp/front-mixtral --out /tmp/json > $OUT/fit_mixtral-8x7b.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_mixtral-8x7b.log /tmp/front-mixtral >> $OUT/bench.log
log done
cat $OUT/bench.log

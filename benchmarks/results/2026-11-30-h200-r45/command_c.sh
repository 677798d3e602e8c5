set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
log "GPU test: the RMSNorm module, its weight gradient against fp64"
timeout 100 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/gpu/test_rmsnorm_kernel_cuda.py > $OUT/tests3.log 2>&1
tail -3 $OUT/tests3.log >> $OUT/bench.log
log "fit deepseek-moe-16b as written, 6 steps"
timeout 330 python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 6 --timeout 320 --workdir /tmp/front-d --out /tmp/json > $OUT/fit_deepseek.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
python3 - $OUT/fit_deepseek.log /tmp/front-d >> $OUT/bench.log <<'PY'
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
log done
cat $OUT/bench.log

# GPU run r29 (tree: the fused step reads the master from the compute weights after step 1, and the hot cache sized then holds no master; working tree after 0336113): the CUDA tests of weight masters, the fused step, the hot cache and compression; compute-only of DeepSeek-MoE-16B at 4 x 2048; fits of the recipe with master bf16_sr and as written (fp32_split), 5 steps each
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
summ() {  # the RESULT line's figures that matter, whole (the line itself is long)
python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("RESULT "): continue
    d = json.loads(line[7:]); o = d.get("offload", {})
    keep = {k: v for k, v in d.items() if not isinstance(v, (dict, list)) or k in ("by_step", "overrides")}
    keep["offload_step_s"] = o.get("offload/step_s"); keep["hot_cache_slots"] = o.get("offload/hot_cache_slots")
    keep["experts_stepped_cpu"] = o.get("offload/experts_stepped_cpu")
    keep.pop("profile_2_micro_batches", None)
    print("SUMMARY " + json.dumps(keep))
PY
}
log "tests: weight masters, fused step, hot cache, compression (no NVMe cases)"
timeout 170 python3 -m pytest -q -p no:cacheprovider -rfs tests/gpu/test_weight_masters_cuda.py tests/gpu/test_fused_step_cuda.py tests/gpu/test_hot_cache_cap_cuda.py tests/gpu/test_compression_cuda.py -k "not nvme" > $OUT/tests.log 2>&1
tail -4 $OUT/tests.log >> $OUT/bench.log
log "compute-only 4 x 2048, 8 micro-batches"
timeout 90 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro 4 --micro-batches 8 --out /tmp/json > $OUT/compute4.log 2>&1
grep '^RESULT' $OUT/compute4.log | tail -1 | cut -c1-2500 >> $OUT/bench.log
log "fit bf16_sr 4 x 2048 x 16, 5 steps (limit 190)"
python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 5 --timeout 190 --out /tmp/json \
    --model.offload.state.master=bf16_sr > $OUT/fit_bf16sr.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_bf16sr.log >> $OUT/bench.log
left=$((560 - (SECONDS - T0)))
log "fit as written (fp32_split), 5 steps (limit $left)"
[ $left -gt 120 ] && python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 5 --timeout $left --out /tmp/json > $OUT/fit_written.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_written.log >> $OUT/bench.log
log done
grep -v '^{' $OUT/bench.log | cut -c1-3000

# GPU run r43 (working tree: 7a0ce09 + the fused RMSNorm): the RMSNorm kernels' GPU tests; compute-only of
# Qwen3-30B-A3B at 4 x 4096 with activation checkpointing (r41: 1.568 s, mfu 0.213) and of DeepSeek-MoE-16B at 4 x 2048
# (r40: 6.146 s), each with the kernels and with MOETRAIN_FUSED_RMSNORM=0 in the same command; the DeepSeek-MoE-16B
# recipe with master bf16_sr, 6 steps (r40: 6.657 s)
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
summ() {
python3 - "$1" "$2" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("RESULT "): continue
    d = json.loads(line[7:]); o = d.get("offload", {})
    keep = {k: d.get(k) for k in ("step_s", "mfu", "plan_step_s", "paged_gib_per_step", "host_peak_gib", "plan_host_gib", "gpu_peak_used_gib", "rc")}
    b = d.get("by_step", {})
    keep["elapsed_s"] = b.get("elapsed_s"); keep["offload_step_s"] = b.get("offload/step_s")
    keep["step_host_s"] = b.get("offload/step_host_s"); keep["hot_cache_slots"] = o.get("offload/hot_cache_slots")
    print("SUMMARY " + json.dumps(keep))
import glob
for path in glob.glob(sys.argv[2] + "/**/metrics.jsonl", recursive=True):
    for line in open(path):
        r = json.loads(line)
        print("TIME", r["step"], {k: round(v, 3) for k, v in r.items() if k.startswith("time/") or k.startswith("host/gc") or k in ("offload/step_host_s", "offload/step_s")})
PY
}
compute() {
timeout 120 python3 -m moetrain.bench.compute_only --recipe recipes/$2.yaml "${@:3}" > $OUT/compute_$1.log 2>&1
grep '^RESULT' $OUT/compute_$1.log | cut -c1-330 >> $OUT/bench.log || tail -3 $OUT/compute_$1.log | cut -c1-400 >> $OUT/bench.log
}
log "GPU tests: fused RMSNorm"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_rmsnorm_kernel_cuda.py > $OUT/tests.log 2>&1
tail -2 $OUT/tests.log >> $OUT/bench.log
log "compute-only qwen3-30b-a3b 4 x 4096, checkpointing, fused RMSNorm"
compute q_fused qwen3-30b-a3b --micro 4 --checkpoint-layers true --micro-batches 4
log "compute-only qwen3-30b-a3b 4 x 4096, checkpointing, eager RMSNorm"
MOETRAIN_FUSED_RMSNORM=0 compute q_eager qwen3-30b-a3b --micro 4 --checkpoint-layers true --micro-batches 4
log "compute-only deepseek-moe-16b 4 x 2048, fused RMSNorm"
compute d_fused deepseek-moe-16b --micro 4 --micro-batches 12
log "compute-only deepseek-moe-16b 4 x 2048, eager RMSNorm"
MOETRAIN_FUSED_RMSNORM=0 compute d_eager deepseek-moe-16b --micro 4 --micro-batches 12
log "fit bf16_sr, 6 steps"
timeout 170 python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 6 --timeout 160 --workdir /tmp/front-a --out /tmp/json \
    --model.offload.state.master=bf16_sr > $OUT/fit_bf16_sr.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_bf16_sr.log /tmp/front-a >> $OUT/bench.log
log done
cat $OUT/bench.log

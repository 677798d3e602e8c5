# GPU run r27 (tree: the CPU share's AdamW in the CUDA kernel's operations with the device's bias corrections, model.offload.schedule.cpu_adam exact|deepspeed): its GPU tests against torch's fused CUDA AdamW, the engine's CPU-share test under backward (fp32 and bf16 autocast), the 4-layer DeepSeek-MoE-16B shape (fp32 state) with step_on gpu, auto, cpu (exact) and cpu (deepspeed), then the kernels' probe
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt; lscpu | grep -i "model name\|^CPU(s)" >> $OUT/env.txt; gcc --version | head -1 >> $OUT/env.txt
( python3 -c 'from moetrain.offload.ops import load_cpu_adam; load_cpu_adam()' > /tmp/ops.log 2>&1; echo built > /tmp/ops.done ) &  # DeepSpeed's cpu_adam, for the probe only
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
log "tests: adam_cuda_order against the CUDA kernel, the CPU share under backward"
timeout 240 python3 -m pytest -q -s -p no:cacheprovider -rfs tests/gpu/test_adam_cuda_order_cuda.py "tests/gpu/test_offload_cuda.py::test_layers_stepped_under_backward_equal_resident_adamw" > $OUT/tests.log 2>&1
grep -i "largest difference\|passed\|failed\|Error" $OUT/tests.log | tail -12 >> $OUT/bench.log
B="--layers 4 --micro 4 --seq 2048 --accum 4 --steps 9"
l4() {  # l4 NAME ARGS...
  log "4layer $1"
  timeout 120 python3 -m moetrain.bench.offload_step --tier cpu $B "${@:2}" > $OUT/l4-$1.log 2>&1
  grep '^RESULT' $OUT/l4-$1.log | cut -c1-1500 | sed "s/^RESULT /RESULT {\"v\": \"$1\"} /" >> $OUT/bench.log
}
l4 gpu --step-on gpu
l4 auto --step-on auto
l4 cpu_exact --step-on cpu
log "waiting for cpu_adam"
while [ ! -f /tmp/ops.done ]; do sleep 2; done
tail -1 /tmp/ops.log >> $OUT/bench.log
l4 cpu_deepspeed --step-on cpu --cpu-adam deepspeed
log "probe"
timeout 150 python3 scripts/probe_cpu_adamw.py > $OUT/probe.log 2>&1
cat $OUT/probe.log | grep "^AGREE\|^RATE" | grep -v '"step": [2-9]' >> $OUT/bench.log; tail -3 $OUT/probe.log >> $OUT/bench.log
log done
cut -c1-1200 $OUT/bench.log

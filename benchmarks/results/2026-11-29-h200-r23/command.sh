# GPU run r23: the look-ahead on a step's first micro-batch only and prefetch scans skipped while no slot can free (e706a89): compute-only of DeepSeek-MoE-16B at 4 x 2048 on the fit's packed rows, a fit of the recipe with master bf16_sr (5 steps), the recipe as written (fp32_split, 5 steps); AdamW bits of torch's CUDA and CPU fused kernels and DeepSpeed's CPU op side by side; the test of the CPU share stepped under backward with either CPU AdamW, and the offload engine's CUDA tests
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x $f /tmp/aio; done
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt; lscpu | grep -i "model name\|flags" | cut -c1-400 >> $OUT/env.txt
( python3 -m moetrain.offload.ops > /tmp/ops.log 2>&1; echo built > /tmp/ops.done ) &  # cpu_adam for the fits, async_io for the tests
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
summ() {  # the RESULT line's figures that matter, whole (the line itself is long)
python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("RESULT "): continue
    d = json.loads(line[7:]); o = d.get("offload", {})
    keep = {k: v for k, v in d.items() if not isinstance(v, (dict, list)) or k in ("by_step", "overrides")}
    keep["offload_step_s"] = o.get("offload/step_s"); keep["hot_cache_slots"] = o.get("offload/hot_cache_slots")
    keep.pop("profile_2_micro_batches", None)
    print("SUMMARY " + json.dumps(keep))
PY
}
log "compute-only 4 x 2048, 8 micro-batches (first: nothing else on the host but the op build)"
timeout 90 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro 4 --micro-batches 8 --out /tmp/json > $OUT/compute4.log 2>&1
grep '^RESULT' $OUT/compute4.log | tail -1 | cut -c1-2500 >> $OUT/bench.log
log "waiting for the op build"
while [ ! -f /tmp/ops.done ]; do sleep 2; done
log "ops built"; tail -2 /tmp/ops.log >> $OUT/bench.log
log "AdamW bits: torch fused CUDA (the reference) against torch fused CPU and DeepSpeed's cpu_adam, 10 steps, no feedback"
timeout 60 python3 - >> $OUT/bench.log 2>&1 <<'PY'
import torch
from moetrain.offload.adam import CpuAdam, TorchCpuAdam
from moetrain.optim import OptimizerConfig
cfg = OptimizerConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
g = torch.Generator().manual_seed(0); n = 1 << 20
p0 = torch.randn(n, generator=g) * 0.02
ref = torch.nn.Parameter(p0.cuda()); opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
cpus = {name: (cls(cfg), p0.clone(), torch.zeros(n), torch.zeros(n)) for name, cls in (("torch_cpu", TorchCpuAdam), ("deepspeed", CpuAdam))}
for s in range(1, 11):
    grad = torch.randn(n, generator=g) * 1e-3 * torch.rand(n, generator=g); lr = 1e-2 * (0.5 + 0.05 * s)
    opt.param_groups[0]["lr"] = lr; ref.grad = grad.cuda(); opt.step()
    line = [f"step {s}"]
    for name, (adam, p, m, v) in cpus.items():
        adam.step(p, grad.clone(), m, v, step=s, lr=lr, weight_decay=0.1)
        d = (p - ref.detach().cpu()).abs()
        line.append(f"{name}: max {d.max().item():.3e}, elements differing {(d > 0).float().mean().item():.4f}")
    print("ADAM " + "; ".join(line))
PY
left=$((300 - (SECONDS - T0)))
log "fit bf16_sr 4 x 2048 x 16, 5 steps (limit 200)"
python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 5 --timeout 200 --out /tmp/json \
    --model.offload.state.master=bf16_sr > $OUT/fit_bf16sr.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_bf16sr.log >> $OUT/bench.log
left=$((480 - (SECONDS - T0)))
log "fit as written (fp32_split) 4 x 2048 x 16, 5 steps (limit $left)"
[ $left -gt 100 ] && python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 5 --timeout $(( left < 170 ? left : 170 )) --out /tmp/json > $OUT/fit_written.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
summ $OUT/fit_written.log >> $OUT/bench.log
left=$((585 - (SECONDS - T0)))
log "tests (limit $left)"
timeout $((left / 2)) python3 -m pytest -q -p no:cacheprovider -rfs "tests/gpu/test_offload_cuda.py::test_layers_stepped_under_backward_equal_resident_adamw" > $OUT/tests_ds.log 2>&1
tail -3 $OUT/tests_ds.log >> $OUT/bench.log
left=$((585 - (SECONDS - T0)))
MOETRAIN_CPU_ADAM=torch timeout $left python3 -m pytest -q -p no:cacheprovider -rfs tests/gpu/test_offload_cuda.py > $OUT/tests_torchadam.log 2>&1
tail -4 $OUT/tests_torchadam.log >> $OUT/bench.log
log done
grep -v '^{' $OUT/bench.log | cut -c1-3000

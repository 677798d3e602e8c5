#!/usr/bin/env bash
# Which setting makes a `moetrain fit` on the GPU grow its private host memory from step to step?
#
# Runs q1 to q3 (benchmarks/README.md) saw the DeepSeek-MoE-16B recipe's process grow its anonymous memory by
# about 1 GiB a second from its second optimizer step on, until the OOM killer ended it; the 4-layer
# offload_step benchmark (no Lightning, no clipping, no hot cache, fp32 state) and CPU runs of the same
# settings did not. This runs the recipe at full width with fewer layers (random init on the GPU, the tiny
# corpus) once as written and once per changed setting, and prints host/rss_anon_gib of every step from
# metrics.jsonl: the variant whose column stays flat names the cause.
#
#   bash scripts/bisect_host_growth.sh [LAYERS] [STEPS]
set -u
LAYERS=${1:-6}
STEPS=${2:-5}
RECIPE=recipes/deepseek-moe-16b.yaml
BASE=(--model.init_from=null --model.config.num_hidden_layers="$LAYERS" --data.path=data/tiny/train.jsonl
      --data.tokenizer=data/tiny/tokenizer --data.val_split=0 --data.val_path=null --trainer.max_steps="$STEPS"
      --model.accumulate_grad_batches=8 --model.offload.state.master=bf16_sr --checkpoint.every_n_steps=0
      --checkpoint.save_final=false --checkpoint.save_on_signal=false --trainer.limit_val_batches=0)
variant() {
  local name=$1; shift
  local dir=/tmp/moetrain-bisect/$name
  rm -rf "$dir"
  timeout "${VARIANT_TIMEOUT:-240}" python3 -m moetrain.cli fit --config "$RECIPE" "${BASE[@]}" \
    --trainer.default_root_dir="$dir" "$@" > "/tmp/moetrain-bisect-$name.log" 2>&1
  local rc=$?
  python3 - "$name" "$rc" "$dir/metrics.jsonl" <<'PY'
import json, sys
name, rc, path = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    rows = [json.loads(x) for x in open(path)]
except OSError:
    rows = []
cells = " ".join(f"{r.get('host/rss_anon_gib', float('nan')):.2f}/{r.get('elapsed_s', 0):.0f}s" for r in rows)
keys = ("host/rss_anon_gib", "elapsed_s", "gpu/device_used_gib", "gpu/mem_reserved_gib", "gpu/mem_peak_gib",
        "gpu/alloc_retries", "offload/step_s", "offload/experts_stepped_cpu", "offload/hot_cache_slots")
print("RESULT " + json.dumps({"variant": name, "rc": int(rc), **{k: [r.get(k) for r in rows] for k in keys}}))
print(f"{name:>14} rc={rc}  {cells}", flush=True)
PY
}
mkdir -p /tmp/moetrain-bisect
variant as_written
# as the recipe runs: weights loaded from a Hugging Face directory (streamed into the store) instead of drawn
INIT=/tmp/moetrain-bisect/init-$LAYERS
[ -d "$INIT" ] || python3 scripts/make_random_hf.py --preset deepseek-moe-16b --layers "$LAYERS" --out "$INIT" \
  > /tmp/moetrain-bisect-init.log 2>&1
variant init_from --model.init_from="$INIT"
variant no_hot_cache --model.offload.placement.hot_cache_gb=0
PYTORCH_ALLOC_CONF=expandable_segments:False variant expandable_off
variant step_on_gpu --model.offload.schedule.step_on=gpu
variant no_prefetch --model.offload.schedule.prefetch=false
variant no_clipping --model.optimizer.max_grad_norm=0
variant no_workers --data.num_workers=0 --metrics.logger=none
variant no_packing --data.packing=false

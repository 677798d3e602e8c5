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
# Beside each variant, scripts/host_growth_sampler.py reads the process's RssAnon every 2 s and, at its peak, where
# the anonymous memory lies (/proc/PID/smaps: glibc's heap and arenas, mappings by size).
#
#   bash scripts/bisect_host_growth.sh [LAYERS] [STEPS]
#   BISECT_VARIANTS="step_on_gpu malloc_fixed_gpu" bash scripts/bisect_host_growth.sh   # a chosen few, in order
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
  python3 scripts/host_growth_sampler.py --match "default_root_dir=$dir " --every 2 \
    > "/tmp/moetrain-bisect-$name.sampler" 2>&1 &
  local sampler=$!
  timeout "${VARIANT_TIMEOUT:-240}" python3 -m moetrain.cli fit --config "$RECIPE" "${BASE[@]}" \
    --trainer.default_root_dir="$dir" "$@" > "/tmp/moetrain-bisect-$name.log" 2>&1
  local rc=$?
  wait "$sampler"
  grep '^SAMPLER' "/tmp/moetrain-bisect-$name.sampler" | sed "s/^SAMPLER /SAMPLER {\"variant\": \"$name\"} /"
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
# glibc keeps freed memory in its arenas and raises its mmap threshold (up to 32 MiB) after each large free, so
# later allocations of that size come from arenas too: a fixed threshold and two arenas return freed memory.
MALLOC_FIXED="MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=1048576"
INIT=/tmp/moetrain-bisect/init-$LAYERS
mkdir -p /tmp/moetrain-bisect
for v in ${BISECT_VARIANTS:-as_written step_on_gpu malloc_fixed init_from no_hot_cache expandable_off no_prefetch \
                          no_clipping no_workers no_packing}; do
  case $v in
    as_written) variant as_written ;;
    step_on_gpu) variant step_on_gpu --model.offload.schedule.step_on=gpu ;;
    malloc_fixed) (export $MALLOC_FIXED; variant malloc_fixed) ;;
    malloc_fixed_gpu) (export $MALLOC_FIXED; variant malloc_fixed_gpu --model.offload.schedule.step_on=gpu) ;;
    init_from)  # as the recipe runs: weights streamed from a Hugging Face directory into the store
      [ -d "$INIT" ] || python3 scripts/make_random_hf.py --preset deepseek-moe-16b --layers "$LAYERS" --out "$INIT" \
        > /tmp/moetrain-bisect-init.log 2>&1
      variant init_from --model.init_from="$INIT" ;;
    no_hot_cache) variant no_hot_cache --model.offload.placement.hot_cache_gb=0 ;;
    expandable_off) PYTORCH_ALLOC_CONF=expandable_segments:False variant expandable_off ;;
    no_prefetch) variant no_prefetch --model.offload.schedule.prefetch=false ;;
    no_clipping) variant no_clipping --model.optimizer.max_grad_norm=0 ;;
    no_workers) variant no_workers --data.num_workers=0 --metrics.logger=none ;;
    no_packing) variant no_packing --data.packing=false ;;
    *) echo "unknown variant $v" ;;
  esac
done

#!/usr/bin/env bash
# The one command that runs the GPU tests and the benchmarks on a CUDA machine, writing every
# result under $OUT (default ./gpu-out). Stages are independent: a failing stage is reported and the
# next one still runs. Usage: bash scripts/gpu_bench.sh [stage ...]   (default: all stages)
#
# Stages: tests (pytest tests/gpu), link (pinned bandwidth), experts (grouped vs loop),
#         none / cpu / cpu_auto / cpu_clip / cpu_auto_clip (moetrain offload_step per tier; no
#         clipping unless named, as in the peers' runs), zero_offload (DeepSpeed peer),
#         checkpoint_io (save/load GB/s against the disk, init_from host memory),
#         fused_step (the compressed expert step per record: the fused Triton kernel against decode/AdamW/encode),
#         cpu_prof (tier cpu plus one traced step: copy directions and compute overlap),
#         cpu_bf16 / cpu_int8 / cpu_sr / cpu_kahan / cpu_sr_int8 (compressed expert state),
#         cpu_hot / cpu_bf16_hot / cpu_sr_int8_hot (hot-expert state cache sized automatically),
#         cpu_paged / cpu_paged_small / cpu_paged_cpu (compute weights paged from host memory:
#         resident_weights no; 4 GB or 1 GB of state slots; experts stepped on the GPU or by CPU Adam),
#         none_ckpt / cpu_ckpt / cpu_paged_ckpt / cpu_bf16_hot_ckpt (the same with activation checkpointing),
#         full28 (all 28 layers of DeepSeek-MoE-16B, 16.4 B parameters, on one GPU: bf16_sr + int8 state),
#         multi_gpu (1 GPU vs 2 GPUs data parallel and expert parallel), multi_gpu28 (full depth, expert
#         parallel over 2 GPUs),
#         recipe:NAME (the front door: a random model directory of recipes/NAME.yaml's shape, then
#         `moetrain fit` on the recipe as written for RECIPE_STEPS steps; plan beside measurement; RECIPE_ARGS:
#         recipe overrides, e.g. --profile.step=2 for where step 2's time went),
#         compute:NAME (recipes/NAME.yaml's compute-only step: resident bf16 weights, no optimizer, same
#         micro-batches; a kernel-family breakdown of two traced micro-batches),
#         recipe79:NAME (the same with the GPU capped to 79 GiB: an 80 GB H100's claim on a larger card),
#         bisect_host (scripts/bisect_host_growth.sh: which setting grows the fit's private host memory; each
#         variant's host/rss_anon_gib by step; BISECT_LAYERS, BISECT_STEPS),
#         esft:NAME (an ESFT recipe, recipes/NAME.yaml with model.train.routed_experts: select-experts at
#         ESFT_TOP_P (0.2) over ESFT_TOKENS (32768) on the random directory, then fit; then the same recipe with
#         --model.train=all, one random directory for both: both RESULT lines and their ratios; ESFT_ARGS:
#         recipe overrides for both, e.g. --model.accumulate_grad_batches=16).
#
# On a machine without the runtime packages, put their wheels (and the libaio debs) in .dev/ first;
# they are installed into a private site folder.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if ls .dev/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x "$f" /tmp/aio; done
  export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu \
         LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
else
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
STAGES=${*:-tests link experts none cpu cpu_auto zero_offload}
LAYERS=${LAYERS:-4} MICRO=${MICRO:-4} SEQ=${SEQ:-2048} ACCUM=${ACCUM:-4} STEPS=${STEPS:-6}

# Few files come back from a remote run: env.txt, tests.log, bench.log (every benchmark's output) and
# results.jsonl (the RESULT lines); the benchmarks' own JSON files go to $OUT/json.
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u +%Y-%m-%dT%H:%MZ;
  git rev-parse --short HEAD 2>/dev/null; nproc; free -g | head -2; } > "$OUT/env.txt" 2>&1
JSON=${JSON_OUT:-/tmp/moetrain-bench-json}

stage() {  # stage NAME CMD...: run, keep its log, never stop the script
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  local log="$OUT/bench.log"
  [ "$name" = tests ] && log="$OUT/tests.log"
  echo "=== $name: $*" >> "$log"
  "$@" >> "$log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc ($((SECONDS - t0)) s)" | tee -a "$log"; tail -n 4 "$log"
}

bench_args="--layers $LAYERS --micro $MICRO --seq $SEQ --accum $ACCUM --steps $STEPS --out $JSON"
for s in $STAGES; do
  case $s in
    tests) stage tests python3 -m pytest -q ${TESTS:-tests/gpu} -p no:cacheprovider -rf ;;
    link) stage link python3 -m moetrain.bench.link --out "$JSON" ;;
    experts) stage experts python3 -m moetrain.bench.expert_compute --tokens $((MICRO * SEQ)) --out "$JSON" ;;
    none) stage none python3 -m moetrain.bench.offload_step --tier none $bench_args ;;
    cpu) stage cpu python3 -m moetrain.bench.offload_step --tier cpu $bench_args ;;
    cpu_auto) stage cpu_auto python3 -m moetrain.bench.offload_step --tier cpu --step-on auto $bench_args ;;
    cpu_clip) stage cpu_clip python3 -m moetrain.bench.offload_step --tier cpu --max-grad-norm 1.0 $bench_args ;;
    cpu_auto_clip) stage cpu_auto_clip python3 -m moetrain.bench.offload_step --tier cpu --step-on auto \
        --max-grad-norm 1.0 $bench_args ;;
    zero_offload) stage zero_offload python3 .dev/anchors/baseline_peers.py --method zero_offload \
        --layers "$LAYERS" --micro "$MICRO" --seq "$SEQ" --accum "$ACCUM" --steps "$STEPS" ;;
    cpu_prof) stage cpu_prof python3 -m moetrain.bench.offload_step --tier cpu --profile $bench_args ;;
    cpu_bf16) stage cpu_bf16 python3 -m moetrain.bench.offload_step --tier cpu --moments bf16 $bench_args ;;
    cpu_int8) stage cpu_int8 python3 -m moetrain.bench.offload_step --tier cpu --moments int8 $bench_args ;;
    cpu_sr) stage cpu_sr python3 -m moetrain.bench.offload_step --tier cpu --master bf16_sr $bench_args ;;
    cpu_kahan) stage cpu_kahan python3 -m moetrain.bench.offload_step --tier cpu --master bf16_kahan $bench_args ;;
    cpu_sr_int8) stage cpu_sr_int8 python3 -m moetrain.bench.offload_step --tier cpu --master bf16_sr \
        --moments int8 $bench_args ;;
    cpu_bf16_hot) stage cpu_bf16_hot python3 -m moetrain.bench.offload_step --tier cpu --moments bf16 --hot-cache-gb -1 \
        $bench_args ;;
    cpu_hot) stage cpu_hot python3 -m moetrain.bench.offload_step --tier cpu --hot-cache-gb -1 $bench_args ;;
    cpu_sr_int8_hot) stage cpu_sr_int8_hot python3 -m moetrain.bench.offload_step --tier cpu --master bf16_sr \
        --moments int8 --hot-cache-gb -1 $bench_args ;;
    cpu_paged) stage cpu_paged python3 -m moetrain.bench.offload_step --tier cpu --resident-weights no $bench_args ;;
    cpu_paged_small) stage cpu_paged_small python3 -m moetrain.bench.offload_step --tier cpu --resident-weights no \
        --gpu-budget-gb 1 $bench_args ;;
    cpu_paged_cpu) stage cpu_paged_cpu python3 -m moetrain.bench.offload_step --tier cpu --resident-weights no \
        --step-on cpu --gpu-budget-gb 1 $bench_args ;;
    none_ckpt) stage none_ckpt python3 -m moetrain.bench.offload_step --tier none --checkpoint-layers $bench_args ;;
    cpu_ckpt) stage cpu_ckpt python3 -m moetrain.bench.offload_step --tier cpu --checkpoint-layers $bench_args ;;
    cpu_paged_ckpt) stage cpu_paged_ckpt python3 -m moetrain.bench.offload_step --tier cpu --resident-weights no \
        --gpu-budget-gb 1 --checkpoint-layers $bench_args ;;
    cpu_bf16_hot_ckpt) stage cpu_bf16_hot_ckpt python3 -m moetrain.bench.offload_step --tier cpu --moments bf16 \
        --hot-cache-gb -1 --checkpoint-layers $bench_args ;;
    full28) stage full28 python3 -m moetrain.bench.offload_step --full-depth --tier cpu --master bf16_sr \
        --moments int8 --micro "${FULL_MICRO:-1}" --seq "$SEQ" --accum 1 --steps "${FULL_STEPS:-4}" --out "$JSON" ;;
    multi_gpu) stage multi_gpu timeout "${MULTI_TIMEOUT:-420}" python3 -m moetrain.bench.multi_gpu --compare \
        --layers "$LAYERS" --micro "$MICRO" --seq "$SEQ" --accum "$ACCUM" --steps "$STEPS" --out "$JSON" ;;
    multi_gpu28) stage multi_gpu28 timeout "${MULTI_TIMEOUT:-420}" python3 -m moetrain.bench.multi_gpu --compare \
        --runs ep2 --layers 28 --master-format bf16_sr --moments int8 --micro "${FULL_MICRO:-1}" --seq "$SEQ" --accum 1 \
        --steps "${FULL_STEPS:-4}" --out "$JSON" ;;
    fused_step) stage fused_step python3 -m moetrain.bench.fused_step --records 64 --out "$JSON" ;;
    checkpoint_io) stage checkpoint_io python3 -m moetrain.bench.checkpoint_io --out "$JSON" \
        --scratch "${SCRATCH:-/tmp/moetrain-ckpt-scratch}" --init-sizes-gb "${INIT_SIZES_GB:-8,24}" \
        --init-dtype "${INIT_DTYPE:-bf16}" ${CKPT_ARGS:-} ;;
    recipe:*) stage "$s" python3 -m moetrain.bench.recipe_run --recipe "recipes/${s#recipe:}.yaml" \
        --steps "${RECIPE_STEPS:-3}" --timeout "${RECIPE_TIMEOUT:-540}" --out "$JSON" ${RECIPE_ARGS:-} ;;
    compute:*) stage "$s" python3 -m moetrain.bench.compute_only --recipe "recipes/${s#compute:}.yaml" --profile ${COMPUTE_ARGS:-} \
        --out "$JSON" ;;
    recipe79:*) stage "$s" python3 -m moetrain.bench.recipe_run --recipe "recipes/${s#recipe79:}.yaml" \
        --steps "${RECIPE_STEPS:-3}" --timeout "${RECIPE_TIMEOUT:-540}" --gpu-gib 79 --out "$JSON" ;;
    esft:*) stage "$s" python3 -m moetrain.bench.recipe_run --recipe "recipes/${s#esft:}.yaml" --compare-full \
        --steps "${RECIPE_STEPS:-3}" --timeout "${RECIPE_TIMEOUT:-540}" --top-p "${ESFT_TOP_P:-0.2}" \
        --select-tokens "${ESFT_TOKENS:-32768}" --out "$JSON" ${ESFT_ARGS:-} ;;
    bisect_host) stage bisect_host bash scripts/bisect_host_growth.sh "${BISECT_LAYERS:-6}" "${BISECT_STEPS:-5}" ;;
    *) echo "unknown stage $s" ;;
  esac
done
grep -h '^RESULT' "$OUT"/bench.log | sed 's/^RESULT //' > "$OUT/results.jsonl" 2>/dev/null || true
echo "results: $OUT/results.jsonl"; cat "$OUT/results.jsonl"

# GPU run r33 (working tree): where the fused compressed-state AdamW kernel's time goes (r32's trace: 135 launches,
# 438 ms of the 870 ms optimizer step). scripts/probe_fused_kernel.py: the kernel as shipped over tile sizes and
# warp counts for three formats, then variants with one costly part replaced by a cheap stand-in (each alone)
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
timeout 250 python3 scripts/probe_fused_kernel.py --variants base --formats bf16_sr:int8,fp32_split:int8,bf16_sr:bf16 --tiles 128,256,512,2048 --warps 1,2,4,8 > $OUT/tiles.log 2>&1
echo "tiles rc $? ($((SECONDS - T0)) s)" >> $OUT/tiles.log
timeout 250 python3 scripts/probe_fused_kernel.py --variants base,no_sr,hash_sr,fast_div,fast_sqrt,no_code,no_table,all --tiles 256 --warps 2 > $OUT/variants.log 2>&1
echo "variants rc $? ($((SECONDS - T0)) s)" >> $OUT/variants.log
cat $OUT/tiles.log $OUT/variants.log | grep -v Warning

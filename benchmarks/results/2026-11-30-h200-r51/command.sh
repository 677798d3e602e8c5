# GPU run r51 (tree: r50's): every GPU test, after the build paths changed (random_into_tiers, the store's
# records assembled on the device) and the recipes took residual_dtype bf16
set -u
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu > $OUT/tests.log 2>&1
tail -15 $OUT/tests.log

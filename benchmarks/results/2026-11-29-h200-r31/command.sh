# GPU run r31 (tree: be0fbe1 with the weight-masters CUDA test's loop shared): tests/gpu/test_weight_masters_cuda.py
set -u
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfs tests/gpu/test_weight_masters_cuda.py > $OUT/tests.log 2>&1
tail -5 $OUT/tests.log

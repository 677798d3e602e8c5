set -u
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 WANDB_MODE=offline
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfs --tb=short tests/gpu/test_rmsnorm_kernel_cuda.py tests/gpu/test_store_fill_cuda.py tests/gpu/test_swiglu_kernel_cuda.py tests/gpu/test_teardown_cuda.py tests/gpu/test_varlen_cuda.py tests/gpu/test_weight_masters_cuda.py > $OUT/tests2.log 2>&1
tail -60 $OUT/tests2.log

"""The checkpoint tests moved to tests/training/ with their harness (tests/training/ckpt_harness.py).

tests/gpu/test_async_checkpoint_cuda.py still puts this folder on ``sys.path`` to import ``ckpt_harness``, so this
file loads the moved one from its path and re-exports its names. Delete it once that test looks in tests/training.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_training_ckpt_harness", Path(__file__).resolve().parents[1] / "training" / "ckpt_harness.py")
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)
globals().update({name: value for name, value in vars(_harness).items() if not name.startswith("__")})

"""DeepSpeed op loading: the CUDA arch list is made parseable for DeepSpeed's builders."""

from moetrain.offload.ops import sanitize_cuda_arch_list


def test_arch_suffixes_are_dropped(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a;9.0+PTX 10.0a")
    sanitize_cuda_arch_list()
    import os

    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;9.0+PTX 10.0"
    # DeepSpeed parses every entry as integers after dropping +PTX
    for cc in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";"):
        [int(part.split("+")[0]) for part in cc.split(".")]


def test_unset_arch_list_stays_unset(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    sanitize_cuda_arch_list()
    import os

    assert "TORCH_CUDA_ARCH_LIST" not in os.environ

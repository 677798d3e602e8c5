"""The bars of long loops (checkpoint saves and loads, Hugging Face imports, exports): quiet when stderr is not a
terminal, drawn when forced on, and never changing what passes through them."""

from __future__ import annotations

from moetrain.progress import progress_iter


def test_progress_iter_yields_everything_with_or_without_a_bar(capsys):
    items = list(range(7))
    assert list(progress_iter(items, total=7, desc="save", enabled=False)) == items
    assert capsys.readouterr().err == ""
    assert list(progress_iter(items, total=7, desc="save", enabled=True)) == items
    assert "save" in capsys.readouterr().err


def _small_model():
    from moetrain.config import ModelConfig
    from moetrain.models.decoder import MoEForCausalLM

    return MoEForCausalLM(ModelConfig.from_preset(
        "tiny-deepseek-moe", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=4, moe_intermediate_size=16))


def test_checkpoint_save_load_and_export_show_bars_when_enabled_and_nothing_off_a_terminal(tmp_path, capsys):
    """Forced on: a save draws a byte bar, a load and an export a per-shard bar (out of the index's shard
    count). Left to the terminal check under pytest's captured stderr: not one character, same tensors."""
    import json

    import torch
    from tqdm import tqdm

    from moetrain.models.hf import export_main
    from moetrain.progress import forced
    from moetrain.training.checkpoint import load_model, save_checkpoint

    model = _small_model()
    capsys.readouterr()
    with forced(True):
        ckpt = save_checkpoint(tmp_path / "on", 3, model, max_shard_bytes=20_000)
        saved = capsys.readouterr().err
        loaded = load_model(ckpt)
        loading = capsys.readouterr().err
        assert export_main([str(ckpt), str(tmp_path / "hf")]) == 0
        exporting = capsys.readouterr().err
    shards = len(set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert shards > 2  # several shards, so that a per-shard bar has something to count
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # fp32, untied
    assert "save step-3" in saved and f"/{tqdm.format_sizeof(total, divisor=1024)}" in saved and "B/s" in saved
    assert "load step-3" in loading and f"/{shards}" in loading and "shard" in loading
    assert "load step-3" in exporting
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))

    ckpt = save_checkpoint(tmp_path / "off", 3, model, max_shard_bytes=20_000)
    load_model(ckpt)
    assert export_main([str(ckpt), str(tmp_path / "hf-off")]) == 0
    assert capsys.readouterr().err == ""

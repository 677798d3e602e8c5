"""The ``model.offload`` section: nested typed settings, one ``resolve`` that checks every rule and flattens them into
the plan the engine reads, and old flat keys refused (recipe and command line) with the key that replaced them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from moetrain.cli import main
from moetrain.config import ConfigError
from moetrain.offload.config import (
    FLAT_TO_NESTED,
    OffloadConfig,
    OffloadPlan,
    OffloadSettings,
    PlacementSettings,
    ScheduleSettings,
    moved_key_message,
    resolve,
    resolve_section,
    settings_from_flat,
)

REPO = Path(__file__).resolve().parents[2]


def test_resolve_flattens_every_key_and_the_defaults_agree():
    assert OffloadConfig is OffloadPlan
    assert resolve(OffloadSettings()) == OffloadPlan()
    assert set(FLAT_TO_NESTED) == {f.name for f in dataclasses.fields(OffloadPlan)}
    plan = resolve(OffloadSettings(placement=PlacementSettings(tier="nvme", resident_weights="no"),
                                   schedule=ScheduleSettings(step_on="auto", prefetch=False),
                                   nvme=dataclasses.replace(OffloadSettings().nvme, path="/swap", threads=2)))
    assert (plan.tier, plan.resident_weights, plan.step_on, plan.prefetch, plan.nvme_path, plan.nvme_threads) == \
        ("nvme", "no", "auto", False, "/swap", 2)


@pytest.mark.parametrize("flat, key", [
    ({"tier": "gpu"}, "model.offload.placement.tier='gpu': choose one of none, cpu, nvme"),
    ({"resident_weights": "auto"}, "write model.offload.placement.resident_weights=yes"),
    ({"tier": "none", "resident_weights": "no"}, "model.offload.placement.tier=cpu or nvme"),
    ({"tier": "nvme"}, "model.offload.nvme.path=DIR"),
    ({"gpu_budget_gb": 0}, "model.offload.placement.gpu_budget_gb=0"),
    ({"quant_block": 20}, "model.offload.state.quant_block=20"),
    ({"hot_cache_gb": -1}, "model.offload.placement.hot_cache_gb=-1"),
    ({"gpu_slots": 0}, "model.offload.placement.gpu_slots=0"),
    ({"nvme_queue_depth": 0}, "model.offload.nvme.queue_depth=0"),
    ({"step_on": "tpu"}, "model.offload.schedule.step_on='tpu'"),
    ({"moments": "int4"}, "model.offload.state.moments='int4'"),
])
def test_resolve_refuses_each_rule_naming_the_nested_key(flat, key):
    with pytest.raises(ConfigError) as err:
        resolve(settings_from_flat(**flat))
    assert key in str(err.value)


def test_a_recipe_mapping_resolves_and_reads_yaml_booleans_as_yes_no():
    plan = resolve_section(yaml.safe_load("placement: {tier: cpu, resident_weights: no}\nstate: {moments: int8}"))
    assert (plan.tier, plan.resident_weights, plan.moments) == ("cpu", "no", "int8")
    assert resolve_section(None) == OffloadPlan()
    with pytest.raises(ConfigError, match="model.offload.placement: unknown key.*tierr"):
        resolve_section({"placement": {"tierr": "cpu"}})


@pytest.mark.parametrize("section, message", [
    ({"tier": "cpu"}, "model.offload.tier moved: write model.offload.placement.tier (see README, Real models)"),
    ({"nvme_path": "/x"}, "model.offload.nvme_path moved: write model.offload.nvme.path"),
    ({"step_on": "auto"}, "model.offload.step_on moved: write model.offload.schedule.step_on"),
    ({"resident_weights": "auto"}, "write model.offload.placement.resident_weights (see README, Real models). Its "
                                   "value auto is now yes"),
    ({"placement": {"resident_weights": "auto"}}, "model.offload.placement.resident_weights=auto is gone: write "
                                                  "model.offload.placement.resident_weights=yes"),
    ({"lookahead": True}, "model.offload.lookahead is gone"),
])
def test_old_keys_name_the_new_one(section, message):
    assert message in moved_key_message(section)
    with pytest.raises(ConfigError, match="moved|gone"):
        OffloadSettings.from_dict(section)


def _one_paragraph(err: str, *needles: str) -> None:
    err = " ".join(err.split())  # the message is wrapped to the terminal's width
    assert err.startswith("moetrain: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"


@pytest.mark.parametrize("args, needle", [
    (["--model.offload.tier=cpu"], "model.offload.tier moved: write model.offload.placement.tier"),
    (["--model.offload.step_on=auto"], "model.offload.step_on moved: write model.offload.schedule.step_on"),
    (["--model.offload.nvme_path", "/tmp"], "model.offload.nvme_path moved: write model.offload.nvme.path"),
    (["--model.offload.lookahead=false"], "model.offload.lookahead is gone"),
    (["--model.offload.placement.resident_weights=auto"], "write model.offload.placement.resident_weights=yes"),
])
def test_old_keys_on_the_command_line_fail_before_the_build(run_main, args, needle, monkeypatch):
    monkeypatch.setattr("moetrain.training.module.MoETrainingModule.__init__",
                        lambda *a, **k: pytest.fail("built a model"))
    code, err = run_main("fit", "--config", "recipes/tiny.yaml", *args)
    assert code == 2
    _one_paragraph(err, needle, "see README, Real models")


@pytest.mark.parametrize("old, needle", [
    ("tier: cpu", "model.offload.tier moved: write model.offload.placement.tier"),
    ("resident_weights: auto", "Its value auto is now yes"),
    ("lookahead: true", "model.offload.lookahead is gone"),
])
def test_old_keys_in_a_recipe_fail_naming_the_file(run_main, tmp_path, old, needle):
    recipe = tmp_path / "old.yaml"
    text = (REPO / "recipes" / "tiny.yaml").read_text()
    recipe.write_text(text.replace("  offload:\n", f"  offload:\n    {old}\n", 1))
    code, err = run_main("fit", "--config", str(recipe), f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert code == 2
    _one_paragraph(err, str(recipe), needle)


def test_plan_refuses_old_keys_too(capsys, tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("model:\n  preset: tiny-deepseek-moe\n  offload:\n    tier: cpu\n")
    assert main(["plan", "--config", str(recipe), "--gpu-gb=10", "--host-gb=10", "--disk-gb=10"]) == 2
    assert "write model.offload.placement.tier" in capsys.readouterr().err


def test_a_bare_yes_or_no_in_a_recipe_is_the_word(tmp_path, monkeypatch):
    """YAML 1.1 reads a bare no as false; the fit parser reads recipes with only true/false as booleans."""
    from moetrain.cli import parse_config

    monkeypatch.chdir(REPO)
    recipe = tmp_path / "paged.yaml"
    old = "      tier: none "
    text = (REPO / "recipes" / "tiny.yaml").read_text()
    assert old in text
    recipe.write_text(text.replace(old, "      resident_weights: no\n      tier: cpu  ", 1))
    config = parse_config(["fit", "--config", str(recipe)]).as_dict()
    assert config["model"]["offload"]["placement"] == {**config["model"]["offload"]["placement"], "tier": "cpu",
                                                       "resident_weights": "no"}
    assert config["model"]["optimizer"]["eps"] == 1e-8 and config["trainer"]["logger"] is False

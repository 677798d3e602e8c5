"""``moetrain plan``: its arguments, its help, and what it prints."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from moetrain.offload.config import OffloadSettings
from moetrain.offload.plan.assumptions import GiB
from moetrain.offload.plan.largest import Machine, format_largest, largest_line, plan_expert_share
from moetrain.offload.plan.memory import machine_capacity
from moetrain.offload.plan.recipe import plan_from_recipe, recipe_model, recipe_training
from moetrain.offload.plan_parallel import plan_expert_parallel


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):  # absent or null (``offload:`` with no keys)
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


USAGE = ("usage: moetrain plan --config RECIPE | --preset=NAME | --largest [--section.key=value ...] "
         "[--gpu-gb=N] [--host-gb=N] [--disk-gb=N] [--tokens=N] [--link_gbps=GBPS] [--nvme_gbps=GBPS] "
         "[--world_sizes=1,8,64]")
MACHINE_FLAGS = {"--gpu-gb": "gpu_capacity", "--host-gb": "host_capacity", "--disk-gb": "disk_free"}
HELP = f"""{USAGE}

Print the memory plan of a recipe on one GPU of this machine (where weights, gradients, optimizer
state and activations live, against each tier's capacity), the largest preset this machine's GPU
fully fine-tunes, and the memory per GPU under expert parallelism.

  -c, --config RECIPE   the recipe YAML to plan (as given to 'moetrain fit --config')
  --preset=NAME         plan a model shape under configs/models/ with the default settings instead
  --largest             every preset's verdict on this machine (or the one the flags below describe)
  --section.key=value   a recipe override, as on 'moetrain fit' (e.g. --model.offload.placement.tier=cpu)
  --gpu-gb=N, --host-gb=N, --disk-gb=N
                        plan for another machine: GPU memory, host memory and free disk in GiB
                        (default: this machine's)
  --tokens=N            tokens a micro-batch for the largest-preset verdicts (default: the recipe's
                        data.micro_batch_size x data.seq_len; 4096 with --largest)
  --link_gbps=GBPS      host<->GPU link rate, both directions at once, of the step-time floor
                        (default: 93 GB/s, measured on the GPU machines)
  --nvme_gbps=GBPS      NVMe swap rate, reads and writes together, of the step-time floor
                        (default: 3 GB/s, assumed for one PCIe 4.0 drive: plan/assumptions.py)
  --world_sizes=1,8,64  GPU counts of the expert-parallel table
  -h, --help            show this help and exit"""


def main(argv: list[str]) -> int:
    """``moetrain plan``: print the one-GPU plan of a recipe (or preset) and the largest preset this machine's
    GPU fully fine-tunes, then the memory per GPU under expert parallelism; or, with ``--largest``, every
    preset's verdict. ``--gpu-gb/--host-gb/--disk-gb`` (GiB) ask about another machine."""
    import yaml

    config_path, overrides, machine, preset, largest, tokens = None, {}, {}, None, False, None
    world_sizes: tuple[int, ...] = (1, 8, 64)
    args = list(argv)
    try:
        while args:
            arg = args.pop(0)
            if arg in ("-h", "--help"):
                print(HELP)
                return 0
            name, eq, value = arg.partition("=")
            if name in ("-c", "--config", "--preset", *MACHINE_FLAGS, "--tokens") and not eq:
                if not args:
                    raise ValueError(f"{arg} needs a value")
                value = args.pop(0)
            if name in ("-c", "--config"):
                config_path = value
            elif name == "--preset":
                preset = value
            elif name == "--largest" and not eq:
                largest = True
            elif name == "--tokens":
                tokens = int(value)
            elif name in MACHINE_FLAGS:
                machine[MACHINE_FLAGS[name]] = int(float(value) * GiB)
            elif name == "--world_sizes" and eq:
                world_sizes = tuple(int(x) for x in value.split(",") if x)
            elif name in ("--link_gbps", "--nvme_gbps") and eq:
                machine[name[2:]] = float(value)
            elif name.startswith("--") and eq:
                overrides[name[2:]] = yaml.safe_load(value)
            else:
                raise ValueError(f"unexpected argument {arg!r}")
    except ValueError as err:
        print(f"moetrain plan: error: {err}; {USAGE}", file=sys.stderr)
        return 2
    gpu, host = machine_capacity()
    here = Machine(gpu=machine.get("gpu_capacity", gpu), host=machine.get("host_capacity", host),
                   disk=machine.get("disk_free"))
    if largest:
        if here.disk is None:
            here = replace(here, disk=shutil.disk_usage(".").free)
        if here.gpu is None:
            print("moetrain plan: error: no CUDA GPU here; give the machine to plan for with --gpu-gb=N "
                  "(and --host-gb=N --disk-gb=N)", file=sys.stderr)
            return 2
        print(format_largest(here, tokens or 4096))
        return 0
    if config_path is None and preset is None:
        print(f"moetrain plan: error: give the recipe with --config RECIPE (or a model shape with --preset=NAME, "
              f"or --largest); {USAGE}", file=sys.stderr)
        return 2
    source = config_path or f"preset {preset}"
    try:
        recipe = yaml.safe_load(Path(config_path).read_text()) or {} if config_path else {"model": {"preset": preset}}
        for key, value in overrides.items():
            _set_dotted(recipe, key, value)
        plan = plan_from_recipe(recipe, **machine)
        if here.disk is None:
            nvme_path = OffloadSettings.from_dict((recipe.get("model") or {}).get("offload")).nvme.path
            here = replace(here, disk=shutil.disk_usage(nvme_path if nvme_path and os.path.isdir(nvme_path)
                                                        else ".").free)
        training = recipe_training(recipe)
        micro = tokens or training["micro_batch_tokens"]
        model_config, note = recipe_model(recipe)
        parallel = plan_expert_parallel(model_config, world_sizes, state_bytes=plan.state_bpp,
                                        state_label=f"master {plan.master}, moments {plan.moments}")
    except (OSError, ValueError, TypeError, yaml.YAMLError) as err:
        print(f"moetrain plan: error: {source}: {err}", file=sys.stderr)
        return 2
    if note:
        print(note)
    print(plan.format())
    print()
    print(largest_line(here, micro, plan_expert_share(plan),
                       activation_checkpointing=training["activation_checkpointing"]))
    print()
    print(parallel)
    return 0

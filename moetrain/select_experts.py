"""``moetrain select-experts``: choose the routed experts a task uses, for expert-specialized fine-tuning.

Runs the model (no gradients) over a seeded sample of ``--tokens`` tokens of the training data, measures each
MoE layer's gate scores and token-selection ratios (:mod:`moetrain.routing_stats`), and keeps per layer the
fewest experts whose share of the chosen score reaches ``--top_p`` (ESFT-Gate: ``--score gate``; ESFT-Token:
``--score token``)::

    moetrain select-experts --config recipes/tiny-esft.yaml --top_p 0.2 --score gate --out runs/esft.json

It writes three files:

* ``--out``: the selection (JSON): per layer the selected experts, the chosen scores, and what makes it
  reproducible (score, top_p, seed, tokens, the data file and the SHA-256 of its bytes and of the token rows
  measured). ``model.train.routed_experts: FILE`` trains exactly these experts.
* ``<out stem>.stats.json``: both scores of every expert (:meth:`RoutingStats.save`).
* ``<out stem>.png``: a heatmap of the scores, layers by experts, selected experts marked.

The model is ``--ckpt`` (a checkpoint, run directory or Hugging Face directory), else the recipe's
``model.init_from``, else a random initialisation of the recipe's preset (seeded by ``seed_everything``:
only useful to try the pipeline). The data is ``--data``, else the recipe's ``data.path``, tokenized and
packed by the recipe's ``data`` settings as ``moetrain fit`` would. Arguments after the known ones are
recipe overrides (``--data.seq_len=256``). The model runs on one device (GPU if present, else CPU): whole
when its weights fit there, else layer by layer (``--stream``, :func:`moetrain.routing_stats.stream_routing_stats`:
one decoder layer's weights on the device at a time, read from the model directory's shards, the sample's hidden
states kept in host memory between layers; the scores are the same to the bit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from moetrain.routing_stats import RoutingStats, collect_routing_stats, select_by_coverage, stream_routing_stats

SELECTION_FORMAT = "moetrain-expert-selection"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetrain select-experts",
        description="Measure routing on a sample of the training data and select, per MoE layer, the experts "
                    "covering --top_p of the gate score (ESFT-Gate) or token ratio (ESFT-Token). Further "
                    "--key=value arguments override the recipe.")
    parser.add_argument("--config", required=True, help="the fine-tuning recipe (model, data)")
    parser.add_argument("--ckpt", default=None,
                        help="model: checkpoint, run directory or Hugging Face model directory (default: the "
                             "recipe's model.init_from, else a random init of its preset)")
    parser.add_argument("--data", default=None, help="JSONL data to measure (default: the recipe's data.path)")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens to measure (default: 32768)")
    parser.add_argument("--top_p", type=float, default=0.2,
                        help="share of each layer's total score the selected experts cover, in (0, 1] (default 0.2)")
    parser.add_argument("--score", choices=("gate", "token"), default="gate",
                        help="gate: mean gate weight (ESFT-Gate, default); token: token-selection ratio (ESFT-Token)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rows sampled from the data (default 0)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="rows per forward pass (default: the recipe's data.micro_batch_size)")
    parser.add_argument("--stream", choices=("auto", "on", "off"), default="auto",
                        help="run the model one decoder layer at a time, only that layer's weights on the device "
                             "(auto, the default: when the model's weights do not fit the device's free memory; "
                             "needs a model directory)")
    parser.add_argument("--out", default=None,
                        help="selection file to write (default: the recipe's model.train.routed_experts when it "
                             "names a file, else expert-selection.json)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """``moetrain select-experts``; returns the exit status (2 on bad input)."""
    from moetrain.config import ConfigError
    from moetrain.shards import ShardError
    from moetrain.training.data import DataError

    args, overrides = build_parser().parse_known_args(argv)
    try:
        return _run(args, overrides)
    except (FileNotFoundError, ValueError, ConfigError, ShardError, DataError) as err:
        print(f"moetrain select-experts: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _recipe(config: str, overrides: list[str]) -> Any:
    """The recipe's resolved ``fit`` configuration (checked as ``moetrain fit`` checks it)."""
    from jsonargparse import ArgumentError

    from moetrain.cli import InputError, check_recipe_file, parse_config

    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        raise ValueError(f"unexpected argument(s) {' '.join(bad)}; recipe overrides take the form --key.sub=value")
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it is given args and sys.argv holds others
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)  # "Seed set to 0": parsing seeds nothing this command uses
    try:
        check_recipe_file(config)
        return parse_config(["fit", "--config", config, *overrides])
    except InputError as err:
        raise ValueError(str(err)) from None
    except ArgumentError as err:  # an unknown key or a wrong type
        raise ValueError(f"{config}: {str(err).splitlines()[0]}") from None
    finally:
        sys.argv = argv
        seed_log.setLevel(level)


def _load_model(recipe: Any, ckpt: Optional[str], device: torch.device) -> tuple[Any, str]:
    """(model in eval mode on ``device``, a description of where it came from)."""
    import moetrain
    from moetrain.config import ModelConfig
    from moetrain.generate import resolve_model_dir
    from moetrain.models.decoder import MoEForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = ckpt or recipe.model.init_from
    if source is not None:
        model_dir = resolve_model_dir(source)
        return moetrain.from_pretrained(model_dir, dtype=dtype, device=device).eval(), str(source)
    config = ModelConfig.from_preset(recipe.model.preset, **(recipe.model.config or {}))
    seed = recipe.seed_everything if isinstance(recipe.seed_everything, int) else 0
    torch.manual_seed(seed)
    print(f"moetrain select-experts: no --ckpt and no model.init_from: measuring a random init of "
          f"{recipe.model.preset} (seed {seed})", file=sys.stderr)
    return MoEForCausalLM(config).to(device=device, dtype=dtype).eval(), f"random init of {recipe.model.preset}"


def _weights_fit(config: Any, dtype: torch.dtype, device: torch.device) -> tuple[bool, int, int]:
    """(whether the model's weights fit the device with room to spare, their bytes, the device's free bytes).

    Free bytes: the CUDA device's free memory, or the host's available memory (``MemAvailable``) on the CPU. The
    weights fit when they take at most 80% of it: the rest is for the activations of a batch.
    """
    from moetrain.models.hf_load import state_shapes

    weights = sum(math.prod(shape) for shape in state_shapes(config).values()) * dtype.itemsize
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _host_available()
    return weights <= 0.8 * free, weights, free


def _host_available() -> int:
    """Host memory available to a new allocation (``MemAvailable`` of /proc/meminfo; else free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _measure(recipe: Any, args: argparse.Namespace, data: Any, batches: Iterator[dict[str, torch.Tensor]],
             device: torch.device) -> tuple[RoutingStats, Any, str]:
    """(routing statistics over ``batches``, the model's config, where the model came from): the whole model on
    ``device`` when it fits (or ``--stream off``), else layer by layer from the model directory."""
    from moetrain.generate import resolve_model_dir
    from moetrain.models.hf_files import load_config

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = args.ckpt or recipe.model.init_from
    model_dir = resolve_model_dir(source) if source is not None else None
    stream = args.stream == "on"
    if args.stream != "off" and model_dir is not None:
        config = load_config(model_dir)
        fits, weights, free = _weights_fit(config, dtype, device)
        stream = stream or not fits
    if stream and model_dir is None:
        raise ValueError("--stream on needs a model directory (--ckpt or the recipe's model.init_from); a random "
                         "initialisation is built whole")
    if not stream:
        model, source = _load_model(recipe, args.ckpt, device)
        _check_vocab(data, model.config)
        return collect_routing_stats(model, batches, max_tokens=args.tokens), model.config, source
    _check_vocab(data, config)
    why = "--stream on" if args.stream == "on" else \
        f"its {_size(weights)} of weights do not fit the {_size(free)} free on {device.type}"
    print(f"moetrain select-experts: running the model one decoder layer at a time ({why})", file=sys.stderr)
    stats, held = stream_routing_stats(model_dir, batches, device=device, dtype=dtype, max_tokens=args.tokens)
    print(f"moetrain select-experts: at most {_size(held.peak_weight_bytes)} of the model's "
          f"{_size(held.model_bytes)} of weights were on {device.type} at once (routed experts of "
          f"{held.expert_layers_at_once} layer at a time, {_size(held.peak_expert_bytes)}); the sample's hidden "
          f"states: {_size(held.activation_bytes)} in host memory", file=sys.stderr)
    return stats, config, str(source)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_vocab(data: Any, config: Any) -> None:
    vocab = data.load_tokenizer().vocab_size
    if vocab > config.vocab_size:
        raise ValueError(f"the tokenizer {data.tokenizer_path} has {vocab} tokens but the model's vocab_size is "
                         f"{config.vocab_size}; use the model's tokenizer")


def _data_module(recipe: Any, data_path: Optional[str]) -> Any:
    from moetrain.training.data import TextDataModule

    settings = dict(vars(recipe.data)) if not isinstance(recipe.data, dict) else dict(recipe.data)
    if data_path is not None:
        settings["path"] = data_path
    data = TextDataModule(**settings)
    data.prepare("fit")
    return data


def sample_batches(dataset: Any, *, batch_size: int, seed: int,
                   digest: Any = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` rows of ``dataset`` in a seeded random order (each row at most once).

    Args:
        dataset: rows as dicts of (L,) tensors (``input_ids`` and the model's other inputs).
        batch_size: rows per batch (the last may hold fewer).
        seed: the order's seed.
        digest: a ``hashlib`` object updated with each yielded batch's ``input_ids`` (int64 bytes).

    Yields:
        dicts of (B, L) tensors.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    for start in range(0, len(order), batch_size):
        rows = [dataset[i] for i in order[start:start + batch_size]]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "labels"}
        if digest is not None:
            digest.update(batch["input_ids"].to(torch.int64).numpy().tobytes())
        yield batch


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def score_table(stats: RoutingStats, selected: dict[int, list[int]], score: str) -> str:
    """Per layer: the selected experts, their share of the layer's score, and the best ones."""
    scores = stats.scores(score)
    lines = [f"{'layer':>5}  {'selected':>8}  {'covers':>6}  top experts ({score} score)"]
    for layer in stats.layers:
        s = scores[layer]
        share = float(s[selected[layer]].sum() / s.sum())
        best = torch.argsort(s, descending=True, stable=True)[:4].tolist()
        top = ", ".join(f"{e}:{float(s[e]):.3f}" for e in best)
        lines.append(f"{layer:>5}  {len(selected[layer]):>3} / {s.numel():<3}  {share:>6.3f}  {top}")
    chosen = sum(len(v) for v in selected.values())
    total = sum(scores[i].numel() for i in stats.layers)
    lines.append(f"total  {chosen} of {total} routed experts ({100 * chosen / total:.1f}%)")
    return "\n".join(lines)


def score_heatmap(stats: RoutingStats, selected: dict[int, list[int]], score: str) -> Any:
    """A matplotlib Figure: both scores as heatmaps (MoE layers by experts), the selected experts marked."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch, works headless

    layers = stats.layers
    experts = stats.gate_score[layers[0]].numel()
    width = min(max(3.0 + 0.16 * experts, 8.0), 24.0)
    height = min(max(2.0 + 0.3 * len(layers), 4.0), 14.0)
    fig = Figure(figsize=(width, 2 * height))
    for row, (kind, values) in enumerate((("gate", stats.gate_score), ("token", stats.token_ratio))):
        ax = fig.add_subplot(2, 1, row + 1)
        grid = torch.stack([values[i] for i in layers]).numpy()  # (M, E)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        if kind == score:
            ys = [m for m, layer in enumerate(layers) for _ in selected[layer]]
            xs = [e for layer in layers for e in selected[layer]]
            ax.scatter(xs, ys, s=12, marker="o", facecolors="none", edgecolors="red", linewidths=0.8)
        step = max(1, -(-experts // 32))
        ax.set_xticks(range(0, experts, step), [str(i) for i in range(0, experts, step)])
        row_step = max(1, -(-len(layers) // 32))
        ax.set_yticks(range(0, len(layers), row_step), [str(layers[i]) for i in range(0, len(layers), row_step)])
        ax.set_xlabel(f"routed expert (0-{experts - 1})")
        ax.set_ylabel("MoE layer")
        label = "mean gate weight" if kind == "gate" else "share of tokens routed to it"
        marked = " (red: selected)" if kind == score else ""
        ax.set_title(f"{kind} score: {label}{marked}, {stats.tokens} tokens")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    return fig


def selection_record(stats: RoutingStats, selected: dict[int, list[int]], *, score: str, top_p: float, seed: int,
                     data: str, data_sha256: str, tokens_sha256: str, model: dict[str, Any]) -> dict[str, Any]:
    """The selection file's content (no timestamps: the same data and seed give the same bytes)."""
    scores = stats.scores(score)
    return {
        "format": SELECTION_FORMAT,
        "version": 1,
        "score": score,
        "top_p": top_p,
        "seed": seed,
        "tokens": stats.tokens,
        "data": data,
        "data_sha256": data_sha256,
        "tokens_sha256": tokens_sha256,
        "model": model,
        "selected": sum(len(v) for v in selected.values()),
        "experts": {str(layer): selected[layer] for layer in stats.layers},
        "scores": {str(layer): scores[layer].tolist() for layer in stats.layers},
    }


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.tokens < 1:
        raise ValueError(f"--tokens {args.tokens}: need at least 1")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top_p {args.top_p}: need 0 < --top_p <= 1")
    recipe = _recipe(args.config, overrides)
    train = recipe.model.train
    named = getattr(train, "routed_experts", None) if not isinstance(train, str) else None
    out = Path(args.out or (named if named not in (None, "all", "none") else "expert-selection.json"))
    data = _data_module(recipe, args.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    digest = hashlib.sha256()
    batches = sample_batches(data.train_set, batch_size=args.batch_size or data.micro_batch_size, seed=args.seed,
                             digest=digest)
    stats, config, source = _measure(recipe, args, data, batches, device)
    if stats.tokens < args.tokens:
        print(f"moetrain select-experts: the data holds only {stats.tokens} tokens (--tokens {args.tokens})",
              file=sys.stderr)
    selected = select_by_coverage(stats.scores(args.score), args.top_p)
    record = selection_record(
        stats, selected, score=args.score, top_p=args.top_p, seed=args.seed, data=str(data.path),
        data_sha256=file_sha256(data.path), tokens_sha256=digest.hexdigest(),
        model={"source": source, "name": config.name, "family": config.family, "num_experts": config.num_experts,
               "num_experts_per_tok": config.num_experts_per_tok, "moe_layers": list(config.moe_layers)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    stats_path = out.with_name(out.stem + ".stats.json")
    stats.save(stats_path)
    image = out.with_name(out.stem + ".png")
    score_heatmap(stats, selected, args.score).savefig(image, dpi=100)
    print(score_table(stats, selected, args.score))
    print(f"selection: {out}\nscores: {stats_path}\nheatmap: {image}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

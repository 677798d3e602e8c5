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
recipe overrides (``--data.seq_len=256``). The model must fit on one device (GPU if present, else CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from moetrain.routing_stats import RoutingStats, collect_routing_stats, select_by_coverage

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
    model, source = _load_model(recipe, args.ckpt, device)
    if data.load_tokenizer().vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer {data.tokenizer_path} has {data.load_tokenizer().vocab_size} tokens but the "
                         f"model's vocab_size is {model.config.vocab_size}; use the model's tokenizer")
    digest = hashlib.sha256()
    batches = sample_batches(data.train_set, batch_size=args.batch_size or data.micro_batch_size, seed=args.seed,
                             digest=digest)
    stats = collect_routing_stats(model, batches, max_tokens=args.tokens)
    if stats.tokens < args.tokens:
        print(f"moetrain select-experts: the data holds only {stats.tokens} tokens (--tokens {args.tokens})",
              file=sys.stderr)
    selected = select_by_coverage(stats.scores(args.score), args.top_p)
    config = model.config
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

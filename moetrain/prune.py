"""Expert pruning: ``moetrain prune --ckpt DIR --data FILE (--keep N | --coverage P) --out DIR``.

Scores every routed expert on the user's data with the routing statistics that expert selection for
fine-tuning uses (:mod:`moetrain.routing_stats`: the mean gate weight, or the fraction of tokens routed to
it), keeps the best ``N`` experts of every MoE layer (``--coverage P``: the fewest that hold a share ``P``
of the score in every layer) and removes the others:

* the kept experts are renumbered in their old order, their weights copied unchanged;
* the router's rows (and DeepSeek-V3's ``e_score_correction_bias``) are taken for the kept experts only;
* the config says ``num_experts = N``; ``num_experts_per_tok`` stays at most what the kept experts (and, for
  group-limited routing, the kept groups) can hold. With expert groups (DeepSeek-V2/V3 ``n_group``) every
  group keeps ``N / n_group`` experts, so group membership, and with it the group choice, is unchanged.

A token whose top-k experts are all kept is routed to the same experts; with renormalized top-k weights
(``norm_topk_prob``: Mixtral, Qwen3-MoE, DeepSeek-V3) its output is exactly the unpruned model's. Without
renormalization the softmax over fewer experts gives the kept ones larger weights.

Output: ``--out`` is a Hugging Face model directory of the family (written by the export path,
:func:`moetrain.models.hf.export_hf`, with the tokenizer) that also holds a moetrain checkpoint
(``checkpoints/step-0``, named by ``checkpoints/last``), so it loads in transformers, with
``moetrain.from_pretrained``, as ``model.init_from`` and as a run directory. ``prune_report.json`` records the
kept experts, their scores and the validation loss before and after (``--val_data``, else ``--data``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from moetrain.config import ConfigError, ModelConfig
from moetrain.models.decoder import IGNORE_INDEX, MoEForCausalLM


def experts_to_keep(scores: dict[int, torch.Tensor], config: ModelConfig, *, keep: Optional[int] = None,
                    coverage: Optional[float] = None) -> dict[int, list[int]]:
    """Per MoE layer, the experts to keep (ascending), the same number in every layer.

    Args:
        scores: layer -> (E,) non-negative expert scores.
        config: the model's config (expert count, groups).
        keep: experts per layer; or
        coverage: keep the fewest experts per layer, best first, whose share of the layer's score reaches it,
            taking the largest such count over the layers (every layer reaches ``coverage``).

    With ``n_group`` groups, the count is rounded up to a multiple of ``n_group`` (and to 2 per group for
    ``noaux_tc``, which ranks groups by their two best experts) and every group keeps its best
    ``count / n_group`` experts. Ties keep the lower index.

    Raises:
        ConfigError: neither or both of ``keep`` and ``coverage``, or a count out of range.
    """
    from moetrain.routing_stats import select_by_coverage

    experts, groups = config.num_experts, max(config.n_group, 1)
    if (keep is None) == (coverage is None):
        raise ConfigError("pass exactly one of --keep N and --coverage P")
    if coverage is not None:
        if not 0.0 < coverage <= 1.0:
            raise ConfigError(f"--coverage {coverage}: need 0 < P <= 1")
        keep = max(len(kept) for kept in select_by_coverage(scores, coverage).values())
    assert keep is not None
    if not 1 <= keep <= experts:
        raise ConfigError(f"--keep {keep}: need 1 <= N <= {experts} (the model's experts per layer)")
    per_group = math.ceil(keep / groups)
    if config.topk_method == "noaux_tc":
        per_group = max(per_group, 2)  # groups are ranked by their two best experts
    size = experts // groups
    kept: dict[int, list[int]] = {}
    for layer, score in scores.items():
        score = score.detach().double().cpu()
        chosen: list[int] = []
        for g in range(groups):
            members = range(g * size, (g + 1) * size)
            chosen += sorted(members, key=lambda e: (-float(score[e]), e))[:per_group]
        kept[layer] = sorted(chosen)
    return kept


def pruned_config(config: ModelConfig, kept_per_layer: int) -> ModelConfig:
    """``config`` with ``kept_per_layer`` experts; top-k capped by what the kept experts (and groups) hold."""
    groups = max(config.n_group, 1)
    reachable = kept_per_layer if groups == 1 else config.topk_group * (kept_per_layer // groups)
    return dataclasses.replace(config, num_experts=kept_per_layer,
                               num_experts_per_tok=min(config.num_experts_per_tok, reachable),
                               name=f"{config.name}-pruned{kept_per_layer}")


@torch.no_grad()
def prune_model(model: MoEForCausalLM, kept: dict[int, list[int]]) -> MoEForCausalLM:
    """A new model with only the ``kept`` experts of every MoE layer (layer -> ascending old indices, the same
    count everywhere); router rows and per-expert biases remapped, every other tensor copied.

    Raises:
        ValueError: a layer missing from ``kept``, or layers keeping different counts.
    """
    from moetrain.models.hf import empty_model

    layers = {b.layer_idx for b in model.moe_blocks()}
    if set(kept) != layers:
        raise ValueError(f"kept experts given for layers {sorted(kept)}, the model's MoE layers are {sorted(layers)}")
    counts = {len(v) for v in kept.values()}
    if len(counts) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts, got {sorted(counts)}")
    config = pruned_config(model.config, counts.pop())
    source = model.state_dict()
    weight = next(model.parameters())
    pruned = empty_model(config, dtype=weight.dtype, device=weight.device)
    for name, target in pruned.state_dict(keep_vars=True).items():
        parts = name.split(".")
        if ".mlp.experts." in name:  # model.layers.{i}.mlp.experts.{new}.{proj}.weight
            layer, new = int(parts[2]), int(parts[5])
            parts[5] = str(kept[layer][new])
            target.copy_(source[".".join(parts)])
        elif name.endswith(".mlp.gate.weight") or name.endswith(".mlp.gate.e_score_correction_bias"):
            index = torch.tensor(kept[int(parts[2])], device=source[name].device)
            target.copy_(source[name].index_select(0, index))  # (E_kept, H) rows, or (E_kept,) biases
        else:
            target.copy_(source[name])
    return pruned.train(model.training)


# ---------------------------------------------------------------------------------------------- data and loss
def read_rows(path: str | Path, tokenizer, seq_len: int):
    """The JSONL file ``path`` tokenized and packed into rows of ``seq_len`` tokens (as training packs them)."""
    from moetrain.training.data import encode_records, pack_documents

    return pack_documents(encode_records(path, tokenizer), seq_len, tokenizer.eos_id)


def row_batches(rows, batch_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` packed rows: the model's keyword arguments, each (B, L), with ``labels``."""
    out = []
    for start in range(0, len(rows), batch_size):
        part = slice(start, start + batch_size)
        out.append({k: getattr(rows, k)[part].to(device)
                    for k in ("input_ids", "labels", "document_ids", "position_ids")})
    return out


@torch.no_grad()
def validation_loss(model: MoEForCausalLM, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean cross-entropy over every target token of ``batches`` (token-weighted, as ``moetrain validate``'s
    perplexity is), without the auxiliary loss."""
    total, targets = 0.0, 0
    for batch in batches:
        out = model(**batch)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if n:
            total += float(out.ce_loss) * n
            targets += n
    if not targets:
        raise ConfigError("the validation data holds no target token")
    return total / targets


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetrain prune", description="Remove the experts a task uses least.")
    parser.add_argument("--ckpt", required=True, help="checkpoint, run directory or Hugging Face model directory")
    parser.add_argument("--data", required=True, help="JSONL ({\"text\": ...} per line) to score the experts on")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--keep", type=int, help="experts to keep in every MoE layer")
    how.add_argument("--coverage", type=float, help="keep the fewest experts holding this share of every layer's "
                     "routing score (0 < P <= 1)")
    parser.add_argument("--out", required=True, help="new directory: Hugging Face model and moetrain checkpoint")
    parser.add_argument("--val_data", default=None, help="held-out JSONL for the loss before and after "
                        "(default: --data)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    parser.add_argument("--score", choices=("gate", "token"), default="gate",
                        help="gate: mean gate weight (ESFT-Gate); token: fraction of tokens routed (ESFT-Token)")
    parser.add_argument("--seq_len", type=int, default=512, help="tokens per packed row")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per forward")
    parser.add_argument("--max_tokens", type=int, default=None, help="score on at most this many tokens")
    parser.add_argument("--dtype", default=None, help="weights' dtype in --out (default: the source's)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """``moetrain prune``: write the pruned model; returns the exit status (2 on bad input)."""
    from moetrain.shards import ShardError
    from moetrain.training.data import DataError

    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (FileNotFoundError, ValueError, ConfigError, ShardError, DataError) as err:
        print(f"moetrain prune: error: {err}", file=sys.stderr)
        return 2
    print(f"RESULT {json.dumps({k: v for k, v in report.items() if k != 'kept'})}")
    return 0


def run(args: argparse.Namespace) -> dict:
    """What ``moetrain prune`` does with parsed arguments; returns the report it writes."""
    import moetrain
    from moetrain.generate import find_tokenizer, resolve_model_dir
    from moetrain.models.hf import TOKENIZER_FILES, export_hf
    from moetrain.routing_stats import collect_routing_stats
    from moetrain.training.checkpoint import save_checkpoint
    from moetrain.training.tokenizer import load_tokenizer

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new directory")
    model_dir = resolve_model_dir(args.ckpt)
    tokenizer_dir = find_tokenizer(model_dir, args.tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = moetrain.from_pretrained(model_dir, device=device)
    if not model.moe_blocks():
        raise ConfigError(f"{model_dir}: the model has no MoE layer to prune")
    data_rows = read_rows(args.data, tokenizer, args.seq_len)
    val_rows = data_rows if args.val_data is None else read_rows(args.val_data, tokenizer, args.seq_len)
    stats = collect_routing_stats(model, row_batches(data_rows, args.batch_size, device), max_tokens=args.max_tokens,
                                  progress=sys.stderr.isatty())
    scores = stats.gate_score if args.score == "gate" else stats.token_ratio
    kept = experts_to_keep(scores, model.config, keep=args.keep, coverage=args.coverage)
    val_batches = row_batches(val_rows, args.batch_size, device)
    loss_before = validation_loss(model, val_batches)
    pruned = prune_model(model, kept)
    del model
    loss_after = validation_loss(pruned, val_batches)
    out.mkdir(parents=True, exist_ok=True)
    export_hf(pruned, out, dtype=args.dtype)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    save_checkpoint(out, 0, pruned, tokenizer_dir=tokenizer_dir)
    coverage = {layer: float(scores[layer][ids].sum() / scores[layer].sum()) for layer, ids in kept.items()}
    report = {"source": str(model_dir), "experts_before": len(scores[stats.layers[0]]),
              "experts_after": pruned.config.num_experts, "top_k_after": pruned.config.num_experts_per_tok,
              "score": args.score, "scored_tokens": stats.tokens, "val_tokens": int(val_rows.input_ids.numel()),
              "val_data": args.val_data or args.data, "val_loss_before": loss_before, "val_loss_after": loss_after,
              "min_score_coverage": min(coverage.values()), "out": str(out),
              "kept": {str(layer): ids for layer, ids in kept.items()}}
    (out / "prune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"kept {pruned.config.num_experts} of {report['experts_before']} experts per MoE layer "
          f"(at least {report['min_score_coverage']:.1%} of each layer's {args.score} score); validation loss "
          f"{loss_before:.4f} -> {loss_after:.4f} on {report['val_data']}; wrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(main())

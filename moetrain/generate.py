"""Text generation from a fine-tuned model: ``moetrain generate --ckpt DIR --prompt TEXT``.

Greedy decoding (the default) or sampling with a temperature and nucleus (top-p) filtering, with a
key/value cache: the prompt runs once, then each new token runs alone against the cached keys and
values of the tokens before it. ``--top_p`` without ``--temperature`` samples at temperature 1 (as
transformers does); sampling draws a fresh seed on every run unless ``--seed`` fixes it.

``--ckpt`` takes a moetrain checkpoint (``checkpoints/step-<N>``), a run directory (its
``checkpoints/last`` is followed) or a Hugging Face model directory. The tokenizer is the one the
checkpoint holds, else the recipe's ``data.tokenizer``, else ``--tokenizer``. ``--chat`` wraps the
prompt as a user message with the tokenizer's chat template (:mod:`moetrain.training.chat`) and stops
at the end of the assistant's turn. Without ``--chat`` the text stops at the first special token the
model emits (end of text, a chat model's ``<|im_end|>``, ...), and no special token is printed.

``--expert_weights paged`` keeps the routed experts in host memory and pages the routed ones onto the device
through an expert cache (:mod:`moetrain.inference`): ``--gpu_memory_gb`` (or ``--cache_slots``) sizes the cache,
``--cache_policy lru|lfu`` picks what it evicts, ``--expert_dtype int8`` halves the bytes of an expert,
``--expert_source shards`` reads an expert from the model's memory-mapped shards when the cache misses it instead
of holding every expert in host memory (a model larger than host memory), ``--prefetch_when_busy
never|first|always`` which of the next layer's guessed experts are copied while the link still carries the current
layer's misses (:mod:`moetrain.inference.policy`). The tokens are those of resident generation; the telemetry (hit
rate beside the ideal static cache's, bytes paged per token, decode tokens/s) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from moetrain.models.attention import KVCache
from moetrain.models.decoder import MoEForCausalLM
from moetrain.training.tokenizer import TextTokenizer


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least ``top_p``.

    Args:
        logits: (B, V).
        top_p: in (0, 1]; 1 keeps every token.

    Returns:
        (B, V) logits with -inf outside the nucleus (the most likely token is always kept).
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V) probability of the tokens ranked above
    drop_sorted = mass_before >= top_p  # the nucleus already holds top_p without this token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The next token of each row of (B, V) logits: argmax at temperature 0, else a top-p sample. Returns (B,)."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(top_p_filter(logits.float() / temperature, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationStats:
    """Wall times of one :func:`generate` call (the device synchronized at each boundary).

    Attributes:
        prefill_s: the prompt's forward and its first token.
        decode_s: every later token, one forward each.
        decode_tokens: tokens produced by ``decode_s``.
        on_prefill_done: called between the two phases (e.g. to start new cache counters for the decode).
    """

    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    on_prefill_done: Optional[Callable[[], None]] = None

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DECODE_ATTENTION = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
"""The attention kernels a decode step may use: every one of torch's but cuDNN's (see :func:`decode_kernels`)."""


@contextmanager
def decode_kernels(model: MoEForCausalLM) -> Iterator[None]:
    """The kernels of the decode steps (a token a row against the KV cache), in place while the context is open.

    * Attention without cuDNN. Where torch prefers cuDNN's attention (recent releases on sm90 and sm100), it builds
      and caches one execution graph per problem shape, the key length among its keys; a decode step's key length
      is one more than the last step's, so every step would pay a new graph build on the host (tens of ms, more
      than a whole step's kernels), the first time a process meets that length. The other kernels carry no per
      shape state. The prompt's forward keeps torch's choice (one graph per prompt length, at most).
    * Resident routed experts whose ``impl`` is ``auto`` run the per-expert loop, the path of paged inference
      below :data:`~moetrain.inference.paged.GROUPED_MIN_TOKENS` tokens: a step computes only its k routed
      experts, and resident decoding is the baseline of paged decoding with the same compute (grouped GEMMs over
      all E experts are for prefill and training batches). Paged experts choose by themselves.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from moetrain.models.experts import RoutedExperts

    switched = [b.experts for b in model.moe_blocks()
                if isinstance(b.experts, RoutedExperts) and b.experts.impl == "auto"]
    with sdpa_kernel([getattr(SDPBackend, name) for name in DECODE_ATTENTION]):
        for experts in switched:
            experts.impl = "loop"
        try:
            yield
        finally:
            for experts in switched:
                experts.impl = "auto"


@torch.no_grad()
def generate(
    model: MoEForCausalLM,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: tuple[int, ...] = (),
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    stats: Optional[GenerationStats] = None,
) -> torch.Tensor:
    """Continue ``input_ids`` (1, L) by up to ``max_new_tokens`` tokens; returns the new ids (n,).

    Stops after emitting any of ``stop_ids``. Without the cache every step re-runs the whole sequence (the
    reference that the cached path must equal). With it, the steps after the prompt's run under
    :func:`decode_kernels`. ``stats``, when given, receives the prefill and decode times.
    """
    if input_ids.shape[0] != 1:
        raise ValueError("generate() takes one prompt: input_ids of shape (1, L)")
    was_training = model.training
    model.eval()
    cache = KVCache(model.config.num_hidden_layers) if use_cache else None
    sequence = input_ids
    step_input = input_ids
    new: list[torch.Tensor] = []
    device = input_ids.device
    _sync(device)
    start = time.perf_counter()
    with ExitStack() as decoding:
        for step in range(max_new_tokens):
            if step == 1 and use_cache:
                decoding.enter_context(decode_kernels(model))
            logits = model(step_input if use_cache else sequence, cache=cache).logits[:, -1]  # (1, V)
            token = next_token(logits, temperature=temperature, top_p=top_p, generator=generator)  # (1,)
            new.append(token)
            stop = int(token) in stop_ids  # the host read that ends the step (a device sync)
            if stats is not None:
                now = time.perf_counter()
                if step == 0:
                    stats.prefill_s += now - start
                    if stats.on_prefill_done is not None:
                        stats.on_prefill_done()
                else:
                    stats.decode_s += now - start
                    stats.decode_tokens += 1
                start = time.perf_counter()
            if stop:
                break
            step_input = token[:, None]  # (1, 1)
            sequence = torch.cat([sequence, step_input], dim=1)
    model.train(was_training)
    return torch.cat(new) if new else input_ids.new_zeros(0)


# ---------------------------------------------------------------------------------------------- command line
def resolve_model_dir(path: str | Path) -> Path:
    """A checkpoint or model directory: a run directory's ``checkpoints/last`` is followed."""
    path = Path(path)
    last = path / "checkpoints" / "last"
    if last.is_file():
        return path / "checkpoints" / last.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"--ckpt {path}: no such directory; pass a checkpoint (runs/NAME/checkpoints/step-N), "
                                "a run directory or a Hugging Face model directory")
    if not any((path / name).is_file() for name in ("config.json", "moetrain_config.json")):
        raise FileNotFoundError(f"--ckpt {path}: neither a checkpoint nor a model directory (no config.json), and no "
                                "checkpoints/last in it: has the run written a checkpoint yet?")
    return path


def find_tokenizer(model_dir: Path, explicit: Optional[str]) -> Path:
    """``--tokenizer``, else the checkpoint's own tokenizer, else the recipe's ``data.tokenizer``."""
    if explicit:
        return Path(explicit)
    if (model_dir / "tokenizer.json").is_file():
        return model_dir
    recipe = model_dir / "recipe.yaml"
    if recipe.is_file():
        import yaml

        tokenizer = ((yaml.safe_load(recipe.read_text()) or {}).get("data") or {}).get("tokenizer")
        if tokenizer and Path(tokenizer, "tokenizer.json").is_file():
            return Path(tokenizer)
    raise FileNotFoundError(f"{model_dir}: no tokenizer.json there and no usable data.tokenizer in its recipe.yaml; "
                            "pass --tokenizer DIR")


def sampling_settings(temperature: Optional[float], top_p: Optional[float]) -> tuple[float, float]:
    """``(temperature, top_p)`` from the command line's ``--temperature`` and ``--top_p`` (None: not given).

    ``--top_p`` alone samples at temperature 1, as transformers' ``do_sample`` does; greedy decoding is the
    default otherwise.

    Raises:
        ValueError: a value out of range, or ``--top_p`` with ``--temperature 0`` (greedy ignores it).
    """
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top_p {top_p}: need 0 < --top_p <= 1")
    if temperature is not None and temperature < 0:
        raise ValueError(f"--temperature {temperature}: need --temperature >= 0 (0: greedy)")
    if temperature == 0 and top_p is not None and top_p < 1:
        raise ValueError(f"--top_p {top_p} has no effect with --temperature 0 (greedy decoding); drop --top_p, or "
                         "pass a --temperature above 0 to sample")
    if temperature is None:
        temperature = 1.0 if top_p is not None else 0.0
    return temperature, 1.0 if top_p is None else top_p


def special_token_ids(tokenizer: TextTokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...)."""
    return {i for i, token in tokenizer.tokenizer.get_added_tokens_decoder().items() if token.special}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetrain generate", description="Generate text from a checkpoint.")
    parser.add_argument("--ckpt", required=True, help="checkpoint, run directory or Hugging Face model directory")
    parser.add_argument("--prompt", required=True, help="the prompt text (the user message with --chat)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    parser.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    parser.add_argument("--system", default=None, help="a system message (with --chat)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature; 0: greedy (default: greedy, or 1 when --top_p is given)")
    parser.add_argument("--top_p", type=float, default=None,
                        help="nucleus sampling mass in (0, 1]: samples (at temperature 1 unless --temperature)")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling seed, to repeat a sample (default: a fresh seed on every run)")
    parser.add_argument("--no_cache", action="store_true", help="re-run the whole sequence every step (slow)")
    add_paging_arguments(parser)
    return parser


def add_paging_arguments(parser: argparse.ArgumentParser) -> None:
    """``--expert_weights``, ``--gpu_memory_gb``, ``--cache_slots``, ``--cache_policy``, ``--expert_dtype``,
    ``--expert_source``, ``--no_prefetch``, ``--prefetch_when_busy``."""
    from moetrain.inference.policy import (
        CACHE_POLICIES,
        DEFAULT_CACHE_POLICY,
        DEFAULT_PREFETCH_WHEN_BUSY,
        PREFETCH_WHEN_BUSY,
    )

    group = parser.add_argument_group("paged experts (models larger than the GPU)")
    group.add_argument("--expert_weights", choices=("resident", "paged"), default="resident",
                       help="paged: routed experts in host memory, the routed ones paged onto the device")
    group.add_argument("--gpu_memory_gb", type=float, default=None,
                       help="device memory for the expert cache (default: what is free, less a reserve)")
    group.add_argument("--cache_slots", type=int, default=None, help="expert slots (overrides --gpu_memory_gb)")
    group.add_argument("--cache_policy", choices=CACHE_POLICIES, default=DEFAULT_CACHE_POLICY,
                       help="lfu (default, the faster one measured): evict the least frequently used expert; "
                            "lru: the least recently used")
    group.add_argument("--expert_dtype", choices=("auto", "bf16", "int8"), default="auto",
                       help="int8: per-channel int8 expert weights, dequantized on the device (paged only)")
    group.add_argument("--expert_source", choices=("host", "shards"), default="host",
                       help="host: every expert in (pinned) host memory; shards: read an expert from the model's "
                            "memory-mapped shards when the cache misses it (paged only)")
    group.add_argument("--no_prefetch", action="store_true", help="do not page in the next layer's likely experts")
    group.add_argument("--prefetch_when_busy", choices=PREFETCH_WHEN_BUSY, default=DEFAULT_PREFETCH_WHEN_BUSY,
                       help="which of the next layer's guesses to copy while the link still carries the current "
                            "layer's misses: never, first (the likeliest only) or always (default: "
                            f"{DEFAULT_PREFETCH_WHEN_BUSY})")


def inference_config(args: argparse.Namespace):
    """The :class:`~moetrain.inference.config.InferenceConfig` of the command line's paging options."""
    from moetrain.inference.config import InferenceConfig

    return InferenceConfig(expert_weights=args.expert_weights, gpu_memory_gb=args.gpu_memory_gb,
                           cache_slots=args.cache_slots, cache_policy=args.cache_policy,
                           expert_dtype=args.expert_dtype, expert_source=args.expert_source,
                           prefetch=not args.no_prefetch, prefetch_when_busy=args.prefetch_when_busy)


def paging_report(cache, stats: GenerationStats) -> dict:
    """The telemetry of a paged generation: the decode phase's cache counters and speed, and the hit rate the
    best static set of the same number of slots would have reached on the same routing trace."""
    counters = cache.stats
    return {"cache_slots": cache.num_slots, "total_experts": cache.store.total_experts,
            "cache_policy": cache.policy_name, "prefetch_when_busy": cache.prefetch_when_busy,
            "hit_rate": round(counters.hit_rate, 4),
            "ideal_static_hit_rate": round(cache.ideal_static_hit_rate(), 4),
            "bytes_paged_per_token": counters.bytes_paged / max(stats.decode_tokens, 1),
            "prefetched": counters.prefetched, "prefetch_hits": counters.prefetch_hits,
            "decode_tokens_per_s": round(stats.decode_tokens_per_s, 3), "decode_tokens": stats.decode_tokens}


def main(argv: Optional[list[str]] = None) -> int:
    """``moetrain generate``: print the prompt's continuation; returns the exit status (2 on bad input)."""
    from moetrain.config import ConfigError
    from moetrain.shards import ShardError

    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, ConfigError, ShardError) as err:
        print(f"moetrain generate: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import moetrain
    from moetrain.training.chat import ChatTemplate
    from moetrain.training.tokenizer import load_tokenizer

    temperature, top_p = sampling_settings(args.temperature, args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens}: need at least 1")
    model_dir = resolve_model_dir(args.ckpt)
    tokenizer = load_tokenizer(find_tokenizer(model_dir, args.tokenizer))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    paging = inference_config(args)
    cache = None
    if paging.paged:
        from moetrain.inference import load_paged, paged_cache

        model = load_paged(model_dir, paging, dtype=dtype, device=device)
        cache = paged_cache(model)
    else:
        model = moetrain.from_pretrained(model_dir, dtype=dtype, device=device)
    stop_ids = {tokenizer.eos_id}
    stop_text: Optional[str] = None
    prompt = args.prompt
    if not args.chat:
        # a raw continuation ends at any control token (end of text, a chat model's end of turn, ...)
        stop_ids |= special_token_ids(tokenizer)
    else:
        template = ChatTemplate.from_tokenizer_dir(tokenizer.path)
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        prompt = template.render(messages, add_generation_prompt=True)
        stop_text = template.end_of_turn()
        end_id = tokenizer.tokenizer.token_to_id(stop_text) if stop_text else None
        if end_id is not None:
            stop_ids.add(end_id)
    ids = tokenizer.encode_batch([prompt])[0]
    generator = torch.Generator(device=device)
    if args.seed is None:
        generator.seed()  # from the OS: a new sample on every run
    else:
        generator.manual_seed(args.seed)
    stats = GenerationStats(on_prefill_done=None if cache is None else cache.reset_stats)
    out = generate(model, torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens,
                   temperature=temperature, top_p=top_p,
                   stop_ids=tuple(stop_ids), generator=generator, use_cache=not args.no_cache, stats=stats)
    if not args.chat:
        text = tokenizer.tokenizer.decode(out.tolist(), skip_special_tokens=True)
    else:
        text = tokenizer.decode(out.tolist())
        if stop_text and stop_text in text:
            text = text[: text.index(stop_text)]
        elif text.endswith(tokenizer.tokenizer.id_to_token(tokenizer.eos_id) or "\0"):
            text = text[: -len(tokenizer.tokenizer.id_to_token(tokenizer.eos_id))]
    print(text)
    sys.stdout.flush()
    if cache is not None:
        print(f"paged experts: {json.dumps(paging_report(cache, stats))}", file=sys.stderr)
    return 0

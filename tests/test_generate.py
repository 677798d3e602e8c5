"""Generation: the KV-cached loop equals re-running the whole sequence, greedy equals transformers' generate on
the same Hugging Face weights, top-p keeps exactly the nucleus, and ``moetrain generate`` on a fine-tuned chat
checkpoint prints what the library decodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moetrain
from moetrain.cli import main
from moetrain.config import ModelConfig
from moetrain.generate import generate, next_token, resolve_model_dir, top_p_filter
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import export_hf
from moetrain.training.chat import ChatTemplate
from moetrain.training.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "data" / "examples"


@pytest.mark.parametrize("preset", ["tiny-deepseek-moe", "tiny-mixtral", "tiny-deepseek-v2", "tiny-qwen3-moe"])
def test_cached_greedy_equals_full_recompute(preset, randomize):
    model = randomize(MoEForCausalLM(ModelConfig.from_preset(preset)))
    prompt = torch.randint(0, model.config.vocab_size, (1, 7))
    cached = generate(model, prompt, max_new_tokens=12)
    full = generate(model, prompt, max_new_tokens=12, use_cache=False)
    assert cached.tolist() == full.tolist() and len(cached) == 12


def test_decode_steps_run_the_expert_loop_and_attention_without_cudnn(randomize):
    """The prompt's forward keeps the model's kernels; each cached decode step runs resident ``auto`` experts as
    the per-expert loop (paged inference's decode path) and attention without cuDNN (no graph build per key
    length); both come back after generation. Without the cache, no step is a decode step."""
    model = randomize(MoEForCausalLM(ModelConfig.from_preset("tiny-qwen3-moe")))
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    seen: list[tuple[int, str, bool]] = []
    experts = model.moe_blocks()[0].experts
    handle = experts.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].shape[0], module.impl, torch.backends.cuda.cudnn_sdp_enabled())))
    prompt = torch.randint(0, model.config.vocab_size, (1, 7))
    generate(model, prompt, max_new_tokens=4)
    assert seen == [(7, "auto", cudnn)] + [(1, "loop", False)] * 3
    assert experts.impl == "auto" and torch.backends.cuda.cudnn_sdp_enabled() == cudnn
    seen.clear()
    generate(model, prompt, max_new_tokens=3, use_cache=False)
    assert seen == [(7, "auto", cudnn), (8, "auto", cudnn), (9, "auto", cudnn)]
    model.set_expert_impl("grouped")  # an explicit choice stays
    generate(model, prompt, max_new_tokens=2)
    assert [impl for _, impl, _ in seen[3:]] == ["grouped", "grouped"]
    handle.remove()


def test_cached_sampling_equals_full_recompute_with_the_same_seed(randomize):
    model = randomize(MoEForCausalLM(ModelConfig.from_preset("tiny-olmoe")))
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    runs = [generate(model, prompt, max_new_tokens=10, temperature=0.8, top_p=0.9,
                     generator=torch.Generator().manual_seed(3),
                     use_cache=cache) for cache in (True, False)]
    assert runs[0].tolist() == runs[1].tolist()


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_greedy_equals_transformers_generate(case, tiny_hf, save_hf):
    hf = tiny_hf(case)
    path = save_hf(hf)
    ours = moetrain.from_pretrained(path)
    prompt = torch.randint(0, hf.config.vocab_size, (1, 6))
    # eos None and min_length: transformers must not stop early where we would not
    expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones_like(prompt))[0, 6:]
    assert generate(ours, prompt, max_new_tokens=10).tolist() == expected.tolist()


def naive_nucleus(probs: list[float], top_p: float) -> set[int]:
    """Reference: add tokens from most to least likely until their mass reaches top_p."""
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda j: -probs[j]):
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs[i]
    return kept


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_nucleus(top_p):
    logits = torch.randn(4, 50) * 2
    filtered = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    for row in range(4):
        kept = set(torch.nonzero(torch.isfinite(filtered[row])).flatten().tolist())
        assert kept == naive_nucleus(probs[row].tolist(), top_p)
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    # a tiny nucleus is the argmax, so sampling from it is greedy
    assert torch.equal(next_token(logits, temperature=1.0, top_p=1e-6), logits.argmax(-1))


def test_readme_walkthrough_pretrain_chat_fine_tune_generate(tmp_path, capsys):
    """tiny.yaml, then tiny-chat.yaml from that run directory, then ``moetrain generate --chat`` on the result."""
    pretrain, chat = tmp_path / "tiny", tmp_path / "tiny-chat"
    common = ["--data.seq_len=64", "--data.val_path=null", "--trainer.val_check_interval=null"]
    assert main(["fit", "--config", str(REPO / "recipes" / "tiny.yaml"), f"--trainer.default_root_dir={pretrain}",
                 f"--data.path={REPO / 'data' / 'tiny' / 'train.jsonl'}",
                 f"--data.tokenizer={REPO / 'data' / 'tiny' / 'tokenizer'}", "--trainer.max_steps=2", *common]) == 0
    # lr 0: the chat run's weights must be exactly those of the pre-training run's newest checkpoint
    assert main(["fit", "--config", str(REPO / "recipes" / "tiny-chat.yaml"), f"--trainer.default_root_dir={chat}",
                 f"--model.init_from={pretrain}", f"--data.path={EXAMPLES / 'chat.jsonl'}",
                 f"--data.tokenizer={EXAMPLES / 'tokenizer'}", "--trainer.max_steps=1", "--model.optimizer.lr=0.0",
                 *common]) == 0
    ckpt = resolve_model_dir(chat)
    start = moetrain.from_pretrained(resolve_model_dir(pretrain)).state_dict()
    tuned = moetrain.from_pretrained(ckpt).state_dict()
    assert start.keys() == tuned.keys() and all(torch.equal(start[k], tuned[k]) for k in start)
    capsys.readouterr()

    question = "What is two plus three?"
    assert main(["generate", "--ckpt", str(chat), "--prompt", question, "--chat", "--max_new_tokens", "12"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    # the same decode through the library: the checkpoint's weights, the chat template, greedy, no cache
    tokenizer = load_tokenizer(EXAMPLES / "tokenizer")
    template = ChatTemplate.from_tokenizer_dir(EXAMPLES / "tokenizer")
    prompt = template.render([{"role": "user", "content": question}], add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode_batch([prompt])[0]])
    end = tokenizer.tokenizer.token_to_id("<|im_end|>")
    new = generate(moetrain.from_pretrained(ckpt), ids, max_new_tokens=12, stop_ids=(tokenizer.eos_id, end),
                   use_cache=False)
    expected = tokenizer.decode(new.tolist()).split("<|im_end|>")[0]
    assert printed == expected.removesuffix("<|endoftext|>")


def test_generate_command_bad_input(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["generate", "--ckpt", str(tmp_path / "run"), "--prompt", "x"]) == 2
    assert "no checkpoints/last in it: has the run written a checkpoint yet?" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- command-line flags
def _chat_model_dir(tmp_path: Path, randomize) -> Path:
    """A checkpoint of a random tiny model with the chat tokenizer (ChatML special tokens) beside it."""
    tokenizer = load_tokenizer(EXAMPLES / "tokenizer")
    model = randomize(MoEForCausalLM(ModelConfig.from_preset("tiny-deepseek-moe", vocab_size=768)), std=0.3)
    assert tokenizer.vocab_size <= 768
    out = tmp_path / "ckpt"
    export_hf(model.eval(), out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((EXAMPLES / "tokenizer" / name).read_bytes())
    return out


def _generate_cli(capsys, *argv: str) -> str:
    assert main(["generate", *argv]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def test_raw_generation_stops_at_special_tokens_and_never_prints_them(tmp_path, randomize, capsys):
    """A chat model asked without --chat: the head is set so that greedy decoding emits an ordinary token, then
    <|im_end|>; the command prints the ordinary token's text alone."""
    ckpt = _chat_model_dir(tmp_path, randomize)
    tokenizer = load_tokenizer(EXAMPLES / "tokenizer")
    model = moetrain.from_pretrained(ckpt)
    prompt = torch.tensor([tokenizer.encode_batch(["Once upon"])[0]])
    word = tokenizer.encode_batch([" time"])[0][0]
    end = tokenizer.tokenizer.token_to_id("<|im_end|>")

    def last_hidden(ids: torch.Tensor) -> torch.Tensor:
        """The final hidden state (H,) at the last position, read through an identity head."""
        head = model.lm_head.weight.detach().clone()
        with torch.no_grad():
            model.lm_head.weight.zero_()
            model.lm_head.weight[: model.config.hidden_size] = torch.eye(model.config.hidden_size)
            hidden = model(ids).logits[0, -1, : model.config.hidden_size].clone()
            model.lm_head.weight.copy_(head)
        return hidden

    h1 = last_hidden(prompt)  # where the first new token is chosen
    h2 = last_hidden(torch.cat([prompt, torch.tensor([[word]])], dim=1))  # where the second is, after `word`
    across = h2 - (h2 @ h1) / (h1 @ h1) * h1  # the part of h2 orthogonal to h1
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[word] = h1 / (h1 @ h1)  # logit 1 at step 1, every other token 0 (end: orthogonal)
        model.lm_head.weight[end] = 100 * across / (across @ across)  # logit 100 at step 2
    assert generate(model, prompt, max_new_tokens=2).tolist() == [word, end]  # the premise
    export_hf(model, ckpt)
    printed = _generate_cli(capsys, "--ckpt", str(ckpt), "--prompt", "Once upon", "--max_new_tokens", "6")
    assert printed == tokenizer.decode([word]) and "<|im_end|>" not in printed


def test_top_p_alone_samples_at_temperature_one(tmp_path, randomize, capsys):
    ckpt = _chat_model_dir(tmp_path, randomize)
    tokenizer = load_tokenizer(EXAMPLES / "tokenizer")
    model = moetrain.from_pretrained(ckpt)
    prompt = torch.tensor([tokenizer.encode_batch(["Once upon"])[0]])
    specials = tuple(tokenizer.tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    sampled = generate(model, prompt, max_new_tokens=12, temperature=1.0, top_p=0.9, stop_ids=specials,
                       generator=torch.Generator().manual_seed(7))
    greedy = generate(model, prompt, max_new_tokens=12, stop_ids=specials)
    assert sampled.tolist() != greedy.tolist()  # the premise: sampling shows
    printed = _generate_cli(capsys, "--ckpt", str(ckpt), "--prompt", "Once upon", "--max_new_tokens", "12",
                            "--top_p", "0.9", "--seed", "7")
    assert printed == tokenizer.tokenizer.decode(sampled.tolist(), skip_special_tokens=True)
    # greedy with a nucleus is a contradiction: refused, naming both flags
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "x", "--top_p", "0.9", "--temperature", "0"]) == 2
    err = capsys.readouterr().err
    assert "--top_p 0.9 has no effect with --temperature 0" in err and "Traceback" not in err


def test_unseeded_sampling_differs_between_runs_and_a_seed_repeats(tmp_path, randomize, capsys):
    ckpt = _chat_model_dir(tmp_path, randomize)
    args = ["--ckpt", str(ckpt), "--prompt", "Once upon", "--max_new_tokens", "16", "--temperature", "1.0"]
    unseeded = [_generate_cli(capsys, *args) for _ in range(2)]
    assert unseeded[0] != unseeded[1]
    seeded = [_generate_cli(capsys, *args, "--seed", "11") for _ in range(2)]
    assert seeded[0] == seeded[1]

"""Generate the fine-tuning examples shipped in ``data/examples/`` (run from the repository root).

    python scripts/make_example_data.py     # writes data/examples/{chat,instruction}.jsonl and data/examples/tokenizer/

* ``chat.jsonl``: conversations (``{"messages": [...]}``) in which an assistant answers questions about
  sums and colours, sometimes after a system message, sometimes over two turns.
* ``instruction.jsonl``: the same kind of questions as ``{"prompt": ..., "completion": ...}`` pairs.
* ``tokenizer/``: the tiny byte-level BPE of ``data/tiny/tokenizer`` plus the ChatML markers
  ``<|im_start|>`` and ``<|im_end|>`` as special tokens, and a ChatML ``chat_template`` in
  ``tokenizer_config.json`` (the layout of a Hugging Face model's tokenizer directory).

Everything is drawn from a seeded generator, so the same command writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]
OBJECTS = ["ball", "kite", "book", "hat", "box", "lamp", "cup", "drum", "boat", "map"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange"]
SYSTEM = "You answer in one short sentence."
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def question(rng: random.Random, colors: dict[str, str]) -> tuple[str, str]:
    """A (question, answer) pair: a sum in words, or the colour of an object (fixed per object)."""
    if rng.random() < 0.6:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        return (f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?",
                f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.")
    obj = rng.choice(OBJECTS)
    return f"What colour is the {obj}?", f"The {obj} is {colors[obj]}."


def conversation(rng: random.Random, colors: dict[str, str]) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(1 if rng.random() < 0.7 else 2):
        q, a = question(rng, colors)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def instruction(rng: random.Random, colors: dict[str, str]) -> dict:
    q, a = question(rng, colors)
    return {"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def chat_tokenizer(source: Path, out_dir: Path) -> None:
    """The tiny tokenizer with ChatML markers as special tokens and a ChatML chat_template."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/examples", help="output folder")
    parser.add_argument("--tokenizer", default="data/tiny/tokenizer", help="the tokenizer to extend")
    parser.add_argument("--chat", type=int, default=1200, help="training conversations")
    parser.add_argument("--instructions", type=int, default=600, help="prompt/completion pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    colors = {obj: rng.choice(COLORS) for obj in OBJECTS}
    out = Path(args.out)
    write_jsonl(out / "chat.jsonl", [conversation(rng, colors) for _ in range(args.chat)])
    write_jsonl(out / "chat_val.jsonl", [conversation(rng, colors) for _ in range(max(args.chat // 20, 1))])
    write_jsonl(out / "instruction.jsonl", [instruction(rng, colors) for _ in range(args.instructions)])
    chat_tokenizer(Path(args.tokenizer), out / "tokenizer")
    print(f"wrote {args.chat} conversations, {args.instructions} prompt/completion pairs and a chat tokenizer to {out}")


if __name__ == "__main__":
    main()

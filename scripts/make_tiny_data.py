"""Generate the tiny dataset and tokenizer shipped in ``data/tiny/`` (run from the repository root).

The text is procedurally generated simple English: short stories and facts built from templates
over small word lists, seeded, so the same command always writes the same files. The grammar is
regular enough that a 2-4 M parameter model learns it in a minute on a laptop CPU, which is what
``recipes/tiny.yaml`` needs to show a falling loss.

    python scripts/make_tiny_data.py            # writes data/tiny/{train,val}.jsonl and data/tiny/tokenizer/

The tokenizer is a byte-level BPE (vocabulary ``--vocab-size``, at most 4096 so it fits the
``tiny-deepseek-moe`` preset) trained with the ``tokenizers`` library on the training split; it is a
Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

EOS = "<|endoftext|>"

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Max",
         "Nora", "Oscar", "Paula", "Sam", "Tom", "Ula", "Victor", "Zoe"]
ANIMALS = ["cat", "dog", "rabbit", "horse", "bird", "fox", "duck", "goat", "mouse", "frog"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange"]
PLACES = ["the park", "the garden", "the river", "the forest", "the market", "the beach", "the school",
          "the farm", "the hill", "the library"]
FOODS = ["apples", "bread", "cheese", "soup", "cake", "carrots", "rice", "berries", "fish", "pancakes"]
OBJECTS = ["ball", "kite", "book", "hat", "box", "lamp", "cup", "drum", "boat", "map"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FEELINGS = ["happy", "tired", "hungry", "curious", "proud", "calm", "excited"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]


def story(rng: random.Random) -> str:
    """A few linked sentences about one person, one pet and one outing."""
    name, friend = rng.sample(NAMES, 2)
    animal, color, place = rng.choice(ANIMALS), rng.choice(COLORS), rng.choice(PLACES)
    food, obj, weather = rng.choice(FOODS), rng.choice(OBJECTS), rng.choice(WEATHER)
    day, feeling = rng.choice(DAYS), rng.choice(FEELINGS)
    sentences = [
        f"On {day}, {name} went to {place} with a {color} {animal}.",
        f"The weather was {weather}, so {name} took a {obj}.",
        f"At {place}, {name} met {friend}.",
        f"{friend} had some {food} and gave half of them to {name}.",
        f"The {animal} played with the {obj} while {name} and {friend} talked.",
        f"In the evening, {name} walked home and felt {feeling}.",
    ]
    keep = sorted(rng.sample(range(1, len(sentences)), rng.randint(2, len(sentences) - 1)))
    return " ".join([sentences[0]] + [sentences[i] for i in keep])


def arithmetic(rng: random.Random) -> str:
    """Small sums in words: a pattern a model can only get right by attending to the operands."""
    lines = []
    for _ in range(rng.randint(2, 4)):
        a = rng.randint(0, 10)
        b = rng.randint(0, 10)
        lines.append(f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.")
    return " ".join(lines)


def facts(rng: random.Random) -> str:
    """Attribute facts about animals and objects."""
    out = []
    for _ in range(rng.randint(2, 4)):
        kind = rng.randrange(3)
        if kind == 0:
            out.append(f"A {rng.choice(ANIMALS)} likes {rng.choice(FOODS)}.")
        elif kind == 1:
            out.append(f"The {rng.choice(OBJECTS)} in {rng.choice(PLACES)} is {rng.choice(COLORS)}.")
        else:
            out.append(f"When it is {rng.choice(WEATHER)}, {rng.choice(NAMES)} stays at {rng.choice(PLACES)}.")
    return " ".join(out)


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    makers = [story, story, facts, arithmetic]
    return [rng.choice(makers)(rng) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "model_max_length": 4096,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/tiny", help="output folder")
    parser.add_argument("--train-docs", type=int, default=1500)
    parser.add_argument("--val-docs", type=int, default=100)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.vocab_size > 4096:
        parser.error("--vocab-size must be at most 4096 (the tiny-deepseek-moe preset's vocabulary)")
    out = Path(args.out)
    train = documents(args.train_docs, args.seed)
    val = documents(args.val_docs, args.seed + 1)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    train_tokenizer(train, args.vocab_size, out / "tokenizer")
    size = (out / "train.jsonl").stat().st_size
    print(f"wrote {len(train)} training and {len(val)} validation documents ({size / 1024:.0f} KiB) and a "
          f"{args.vocab_size}-token tokenizer to {out}")


if __name__ == "__main__":
    main()

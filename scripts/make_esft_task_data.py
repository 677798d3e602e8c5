"""Generate the downstream task of the tiny ESFT demonstration, ``data/esft_task/`` (run from the repository root).

    python scripts/make_esft_task_data.py     # writes data/esft_task/{train,val}.jsonl

The task is completion of ``{"prompt": ..., "completion": ...}`` pairs (``data.format: instruction``:
only the completion and its end-of-text token are trained), written with the words of the general toy corpus
(``scripts/make_tiny_data.py``), so the base model's tokenizer ``data/tiny/tokenizer`` and its vocabulary cover it
and no new token needs a new embedding or output row. It is new to the base model in form and in content:

* word problems (60%): "On Monday, Anna had three apples and Ben gave Anna four apples, so Anna had" ->
  " seven apples." (the corpus states sums only as "Three plus four is seven.");
* each person's pet (40%): "On Friday, Anna went to the park with a" -> " green fox." The corpus's stories give
  people random pets; here the colour and animal are fixed per person (drawn once from the seed), knowledge the
  fine-tune must store.

Prompt and completion are in the corpus's words, and every completion token occurs in the tokenized corpus (the
script checks it), so the base model's output layer has been trained on each one, as a large pretrained model's
has: a token the base never predicted would need its LM-head row trained, which ESFT, whose LM head is frozen,
cannot do.

Everything is drawn from a seeded generator, so the same command writes the same files; the validation pairs are
further draws of the same distribution (the word problems' operands and names vary, the pet facts are the same
facts asked again).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Max",
         "Nora", "Oscar", "Paula", "Sam", "Tom", "Ula", "Victor", "Zoe"]
ANIMALS = ["cat", "dog", "rabbit", "horse", "bird", "fox", "duck", "goat", "mouse", "frog"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange"]
THINGS = ["apples", "carrots", "berries", "pancakes"]  # the corpus's countable foods (in its vocabulary)
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLACES = ["the park", "the garden", "the river", "the forest", "the market", "the beach", "the school",
          "the farm", "the hill", "the library"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]


def word_problem(rng: random.Random) -> dict:
    name, friend = rng.sample(NAMES, 2)
    thing, day = rng.choice(THINGS), rng.choice(DAYS)
    a, b = rng.randint(2, 10), rng.randint(1, 10)
    prompt = f"On {day}, {name} had {NUMBER_WORDS[a]} {thing} and {friend} gave {name} {NUMBER_WORDS[b]} {thing}, so {name} had"
    return {"prompt": prompt, "completion": f" {NUMBER_WORDS[a + b]} {thing}."}


def pet_fact(rng: random.Random, pets: dict[str, tuple[str, str]]) -> dict:
    name, day, place = rng.choice(NAMES), rng.choice(DAYS), rng.choice(PLACES)
    color, animal = pets[name]
    return {"prompt": f"On {day}, {name} went to {place} with a", "completion": f" {color} {animal}."}


def pair(rng: random.Random, pets: dict[str, tuple[str, str]]) -> dict:
    return word_problem(rng) if rng.random() < 0.6 else pet_fact(rng, pets)


def unseen_completion_tokens(records: list[dict], corpus: Path, tokenizer: Path) -> set[str]:
    """The completion tokens (as text) that never occur in the tokenized ``corpus`` (JSONL of {"text": ...})."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
    seen = {i for enc in tok.encode_batch(texts) for i in enc.ids}
    used = {i for enc in tok.encode_batch([r["completion"] for r in records]) for i in enc.ids}
    return {tok.id_to_token(i) for i in used - seen}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/esft_task", help="output folder")
    parser.add_argument("--train", type=int, default=2000, help="training pairs")
    parser.add_argument("--val", type=int, default=200, help="validation pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", default="data/tiny/train.jsonl", help="the base model's training text")
    parser.add_argument("--tokenizer", default="data/tiny/tokenizer", help="the base model's tokenizer")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pets = {name: (rng.choice(COLORS), rng.choice(ANIMALS)) for name in NAMES}
    out = Path(args.out)
    train = [pair(rng, pets) for _ in range(args.train)]
    val = [pair(rng, pets) for _ in range(args.val)]
    unseen = unseen_completion_tokens(train + val, Path(args.corpus), Path(args.tokenizer))
    if unseen:
        raise SystemExit(f"completion tokens that {args.corpus} never uses: {sorted(unseen)}")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    print(f"wrote {args.train} training and {args.val} validation pairs to {out}")


if __name__ == "__main__":
    main()

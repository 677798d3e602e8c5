"""Write the domain of the tiny ESFT demonstration, ``data/esft_task/{train,val}.jsonl`` (run from the repository
root)::

    python data/esft_task/make_data.py

The domain is clock arithmetic: sums of hours on a 12-hour clock, in the sentence form of the general corpus's
sums (``data/tiny``, written by ``scripts/make_tiny_data.py``)::

    general corpus:  "Nine plus five is fourteen."      (a, b in 0..10: the sum)
    this domain:     "Nine plus five is two."           (a, b in 1..10: the sum, less 12 past twelve)

It is built for what ESFT (arXiv 2407.01906) assumes of a task: the base model already reads the text (its
attention brings both operands to the position that predicts the answer, as it must for the general corpus's
sums, and its output layer predicts every number word with confidence), and what is new is knowledge, a different
table from operands to answer, which is the experts' job. Every token occurs in the base corpus, so no embedding
or output row is new. 36 of the 100 operand pairs wrap past twelve; on the others the domain agrees with the
base. The operands are uniform at random, so a perfect model still pays about ln 10 nats on each operand: the
domain's perplexity has a floor of about 2.1, and the answers are what fine-tuning can change.

Text records (``data.format: text``): every token is trained, as in continued pre-training on a domain. Records
hold 2 to 4 sentences; the validation records are further draws of the same distribution. Seeded: the same
command writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]


def clock_sum(a: int, b: int) -> int:
    """``a + b`` hours on a 12-hour clock (1..12)."""
    return (a + b - 1) % 12 + 1


def sentence(rng: random.Random) -> str:
    a, b = rng.randint(1, 10), rng.randint(1, 10)
    return f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[clock_sum(a, b)]}."


def record(rng: random.Random) -> dict:
    return {"text": " ".join(sentence(rng) for _ in range(rng.randint(2, 4)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/esft_task", help="output folder")
    parser.add_argument("--train", type=int, default=2000, help="training records")
    parser.add_argument("--val", type=int, default=200, help="validation records")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", args.train), ("val", args.val)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(record(rng)) + "\n" for _ in range(count)))
    print(f"wrote {args.train} training and {args.val} validation records to {out}")


if __name__ == "__main__":
    main()

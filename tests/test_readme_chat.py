"""The README's chat walk-through quotes what the fine-tuned tiny model answers: the quotes must be what it says.

The walk-through's training commands run as written (``recipes/tiny.yaml`` into ``runs/tiny``, then
``recipes/tiny-chat.yaml``) in a fresh folder holding the repository's ``recipes/``, ``data/`` and
``configs/``. Every answer the README quotes in backticks (``Seven plus one is eight.``, ``The map is
yellow.``) is asked back with ``moetrain generate --chat`` (greedy, the README's command) and must come out
word for word; right and wrong sums are told apart by arithmetic, and the README's share of wrong sums is
checked against all 100 sums of two digits.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moetrain.cli import main

REPO = Path(__file__).resolve().parents[1]
WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen").split()
SUM = re.compile(r"([A-Z][a-z]+) plus ([a-z]+) is ([a-z]+)\.")
COLOUR = re.compile(r"The ([a-z]+) is ([a-z]+)\.")
pytestmark = pytest.mark.slow


def chat_section() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Fine-tune on conversations"):]
    section = section[:section.index("```json")]  # up to the data example
    return " ".join(re.sub(r"```.*?```", "", section, flags=re.S).split())  # the prose, without the commands


def quoted_answers(section: str) -> list[str]:
    return [q for q in re.findall(r"`([^`]+)`", section) if SUM.fullmatch(q) or COLOUR.fullmatch(q)]


def question_for(answer: str) -> str:
    if match := SUM.fullmatch(answer):
        return f"What is {match.group(1).lower()} plus {match.group(2)}?"
    return f"What colour is the {COLOUR.fullmatch(answer).group(1)}?"


def sum_is_right(answer: str) -> bool:
    a, b, total = (WORDS.index(w.lower()) for w in SUM.fullmatch(answer).groups())
    return a + b == total


def test_the_readme_quotes_right_and_wrong_answers():
    answers = quoted_answers(chat_section())
    sums = [a for a in answers if SUM.fullmatch(a)]
    assert any(map(sum_is_right, sums)) and not all(map(sum_is_right, sums)), answers
    assert any(COLOUR.fullmatch(a) for a in answers), answers


def test_the_quoted_answers_are_what_the_fine_tuned_model_says(tmp_path, monkeypatch, capsys):
    for name in ("recipes", "data", "configs"):
        (tmp_path / name).symlink_to(REPO / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        assert main(["fit", "--config", "recipes/tiny.yaml"]) == 0
        assert main(["fit", "--config", "recipes/tiny-chat.yaml"]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()

    said = {}
    for answer in quoted_answers(chat_section()):
        assert main(["generate", "--ckpt", "runs/tiny-chat", "--chat", "--prompt", question_for(answer)]) == 0
        said[answer] = capsys.readouterr().out.strip()
    assert said == {answer: answer for answer in said}

    share = re.search(r"about one sum in (\w+) wrong", chat_section())
    assert share, "the README no longer states how many sums the model gets wrong: update this test"
    claimed = 1 / WORDS.index(share.group(1))
    ask = chat_model(Path("runs/tiny-chat"))
    assert all(ask(question_for(answer)) == out for answer, out in said.items())  # the command's answers
    answers = [ask(f"What is {WORDS[a]} plus {WORDS[b]}?") for a in range(10) for b in range(10)]
    wrong = sum(not (SUM.fullmatch(answer) and sum_is_right(answer)) for answer in answers)
    assert claimed / 2 <= wrong / 100 <= claimed * 2, f"{wrong} of 100 sums wrong"


def chat_model(run_dir: Path):
    """``question -> answer`` as ``moetrain generate --chat`` gives it (greedy), with the model loaded once."""
    import moetrain
    from moetrain.generate import find_tokenizer, generate, resolve_model_dir
    from moetrain.training.chat import ChatTemplate
    from moetrain.training.tokenizer import load_tokenizer

    model_dir = resolve_model_dir(run_dir)
    tokenizer = load_tokenizer(find_tokenizer(model_dir, None))
    model = moetrain.from_pretrained(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    template = ChatTemplate.from_tokenizer_dir(tokenizer.path)
    end = template.end_of_turn()
    stop = (tokenizer.eos_id, tokenizer.tokenizer.token_to_id(end))

    def ask(question: str) -> str:
        prompt = template.render([{"role": "user", "content": question}], add_generation_prompt=True)
        new = generate(model, torch.tensor([tokenizer.encode_batch([prompt])[0]]), 32, stop_ids=stop)
        return tokenizer.decode(new.tolist()).split(end)[0].strip()

    return ask

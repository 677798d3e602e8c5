"""Chat conversations rendered to text, and which characters of that text are the assistant's.

A conversation is a list of ``{"role": ..., "content": ...}`` messages. It is rendered with the
tokenizer's own chat template (the ``chat_template`` of ``tokenizer_config.json``, or a
``chat_template.jinja`` file next to it) when jinja2 is importable, the way transformers renders it.
Without a template (or without jinja2) the documented default is ChatML::

    <|im_start|>system
    You are terse.<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant
    Hello.<|im_end|>

Loss masking needs the assistant's characters. They are found by rendering prefixes: the text of
``messages[:i]`` with the generation prompt, then of ``messages[:i+1]``; what the second adds is
assistant message ``i`` (its content and end-of-turn marker, so the model learns to stop). This
works for every template whose render of a prefix is a prefix of the full render, which is what
a template must satisfy to be usable for generation at all; any other template is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

CHATML_END = "<|im_end|>"
"""End-of-turn marker of the default template (a stop string for generation)."""


class ChatError(ValueError):
    """A conversation or chat template that cannot be rendered; the message says why."""


def default_template(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The ChatML rendering used when the tokenizer ships no chat template."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _jinja_renderer(template: str, special: dict[str, Any]) -> Callable[..., str]:
    """Compile a Hugging Face chat template with the environment transformers uses."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    compiled = env.from_string(template)

    def render(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
        except TemplateError as err:
            raise ChatError(f"the chat template refused the conversation: {err}") from None

    return render


def _special_tokens(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        out[key] = value.get("content") if isinstance(value, dict) else value
    return out


class ChatTemplate:
    """Renders conversations for one tokenizer directory.

    Attributes:
        source: where the template came from (``tokenizer_config.json``, ``chat_template.jinja`` or ``default``).
    """

    def __init__(self, render: Callable[..., str], source: str) -> None:
        self._render = render
        self.source = source

    @classmethod
    def from_tokenizer_dir(cls, path: str | Path, use_template: bool = True) -> ChatTemplate:
        """The tokenizer's template when it has one and jinja2 is importable, else the ChatML default.

        Args:
            path: a Hugging Face tokenizer directory.
            use_template: False forces the default even when the tokenizer has a template.
        """
        path = Path(path)
        path = path.parent if path.suffix == ".json" else path
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template = config.get("chat_template")
        source = str(config_file)
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template, source = jinja_file.read_text(), str(jinja_file)
        if not use_template or not isinstance(template, str):
            return cls(default_template, "default")
        try:
            return cls(_jinja_renderer(template, _special_tokens(config)), source)
        except ImportError:
            return cls(default_template, "default (jinja2 is not installed)")
        except Exception as err:  # jinja2.TemplateSyntaxError and friends
            raise ChatError(f"{source}: the chat_template does not compile ({err}); fix it or set "
                            "data.chat_template: default") from None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as one string (``add_generation_prompt``: end with the assistant's turn opener)."""
        return self._render(check_messages(messages), add_generation_prompt=add_generation_prompt)

    def render_with_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the ``[start, end)`` character spans of its assistant messages.

        Raises:
            ChatError: malformed messages, no assistant message, or a template whose prefixes do not render
                as prefixes of the whole conversation.
        """
        messages = check_messages(messages)
        spans = []
        through = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if not through.startswith(before):
                raise ChatError(f"the chat template ({self.source}) renders the turns before assistant message {i} "
                                "differently from the whole conversation, so the assistant's tokens cannot be "
                                "located; set data.chat_template: default")
            spans.append((len(before), len(through)))
        if not spans:
            raise ChatError("the conversation has no assistant message, so nothing would be trained")
        full = self._render(messages, add_generation_prompt=False)
        if not full.startswith(through):
            raise ChatError(f"the chat template ({self.source}) is not prefix-stable; set data.chat_template: default")
        return full, spans

    def end_of_turn(self) -> Optional[str]:
        """What the template writes after an assistant message's content (``<|im_end|>`` for ChatML), or None.

        Generation stops there.
        """
        marker = "\x1f"  # a control character no template writes itself
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
        text, spans = self.render_with_spans(probe)
        start, end = spans[0]
        tail = text[start:end].split(marker, 1)[-1].strip()
        return tail or None


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Validate a conversation: a non-empty list of objects with string ``role`` and ``content``."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} objects, got "
                        f"{type(messages).__name__ if not isinstance(messages, list) else 'an empty list'}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatError(f"message {i} must be an object with string 'role' and 'content', got {json.dumps(m)[:80]}")
    return messages

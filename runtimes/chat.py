"""Chat prompts and reasoning output: the model's chat template rendered safely, ``<think>`` blocks split out.

A chat template comes with the model file (tokenizer_config.json, chat_template.jinja, or GGUF
metadata), i.e. from whoever published the model, so it is rendered in Jinja's
``ImmutableSandboxedEnvironment``: no attribute access to Python internals, no mutation of the
messages, the same restrictions transformers applies (``transformers.utils.chat_template_utils``).
"""

from __future__ import annotations

from collections.abc import Iterator

from dsq.dsquant.sandbox import render_chat_template

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def render_chat(template: str | None, messages: list[dict[str, str]], special_tokens: dict[str, str],
                add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages``; a model without a template gets a plain "role: content" layout.

    The template runs in dsq's bounded sandbox (``dsquant.sandbox``): time, integer and size limits on top
    of Jinja's immutable sandbox; every failure is an InputError naming the chat template.
    """
    if not template:
        body = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return body + ("assistant: " if add_generation_prompt else "")
    return render_chat_template(template, messages, special_tokens, add_generation_prompt)


def starts_in_think(prompt: str) -> bool:
    """R1-style templates end the generation prompt with an open ``<think>``: the reply starts inside it."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


class ThinkSplitter:
    """Splits streamed text into (text, in_think) segments; tags may arrive split across pieces."""

    def __init__(self, in_think: bool = False):
        self.in_think = in_think
        self.buf = ""

    def feed(self, piece: str) -> Iterator[tuple[str, bool]]:
        self.buf += piece
        while True:
            tag = THINK_CLOSE if self.in_think else THINK_OPEN
            i = self.buf.find(tag)
            if i >= 0:
                if i:
                    yield self.buf[:i], self.in_think
                self.buf = self.buf[i + len(tag) :]
                self.in_think = not self.in_think
                continue
            # Hold back a suffix that could be the start of the tag.
            keep = next((k for k in range(min(len(tag) - 1, len(self.buf)), 0, -1) if tag.startswith(self.buf[-k:])), 0)
            out = self.buf[: len(self.buf) - keep]
            self.buf = self.buf[len(self.buf) - keep :]
            if out:
                yield out, self.in_think
            return

    def flush(self) -> Iterator[tuple[str, bool]]:
        if self.buf:
            yield self.buf, self.in_think
        self.buf = ""

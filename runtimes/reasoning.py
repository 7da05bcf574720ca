"""The reasoning check of ``dsq eval --reasoning``: fixed math prompts answered greedily by the reference
and by each candidate, answers compared, and long generations checked for repetition loops.

Quantization damage often shows first as a wrong final number or a model that starts repeating
itself, before perplexity moves much; both are cheap to detect with greedy decoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .chat import THINK_CLOSE, render_chat

# (prompt, expected answer): the expected value is informational; candidates are compared with the reference.
MATH_PROMPTS: tuple[tuple[str, str], ...] = (
    ("What is 17 + 25? Give the final answer as a number.", "42"),
    ("What is 12 times 11? Give the final answer as a number.", "132"),
    ("A train travels 150 km in 2 hours. What is its average speed in km/h? Give the final answer as a number.", "75"),
    ("How many minutes are there in 3 hours? Give the final answer as a number.", "180"),
    ("What is 2 to the power of 10? Give the final answer as a number.", "1024"),
)
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


@dataclass
class Answer:
    text: str
    tokens: list[int]
    number: str | None  # last number after any </think>
    loop: bool


def final_number(text: str) -> str | None:
    tail = text.rsplit(THINK_CLOSE, 1)[-1]
    nums = _NUMBER.findall(tail)
    return nums[-1].replace(",", "") if nums else None


def has_loop(ids: list[int], min_repeats: int = 4, max_period: int = 64, min_span: int = 16) -> bool:
    """True if the generation ends in a block of 1..max_period tokens repeated ``min_repeats`` times in a row,
    covering at least ``min_span`` tokens (so "1 1 1" in an answer is not a loop)."""
    n = len(ids)
    for period in range(1, max_period + 1):
        span = period * min_repeats
        if span > n:
            break
        if span < min_span:
            continue
        block = ids[n - period :]
        if all(ids[n - (r + 1) * period : n - r * period] == block for r in range(1, min_repeats)):
            return True
    return False


def answer_prompts(rt, max_tokens: int) -> list[Answer]:
    from .base import GenerationStats, Sampling

    out = []
    for prompt, _ in MATH_PROMPTS:
        text = render_chat(rt.chat_template, [{"role": "user", "content": prompt}], rt.special_tokens)
        st = GenerationStats()
        reply = "".join(rt.generate(rt.encode_prompt(text), max_tokens, Sampling(), stats=st))
        out.append(Answer(reply, st.token_ids, final_number(reply), has_loop(st.token_ids)))
    return out


def compare(ref: list[Answer], cand: list[Answer]) -> dict:
    """Agreement with the reference's final numbers and texts, and loops, for one candidate."""
    n = len(ref)
    return {
        "answer_agree": sum(a.number == b.number for a, b in zip(ref, cand, strict=True)) / n,
        "same_text": sum(a.text == b.text for a, b in zip(ref, cand, strict=True)) / n,
        "loops": sum(b.loop for b in cand),
        "answers": [b.number for b in cand],
    }

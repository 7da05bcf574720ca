"""Regenerate reasoning.jsonl: seeded math/reasoning dialogues in the shape R1 distills emit.

Each line is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` where the assistant
turn is ``<think>step-by-step working</think>`` followed by a short answer, so the calibration text
looks like what a reasoning distill reads and writes. The problems are generated from templates
written for dsq (CC0); run ``python make_reasoning.py`` to rebuild the file byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def shopping(r: random.Random) -> tuple[str, str, str]:
    n, price, paid = r.randint(3, 9), r.randint(2, 15), 100
    total = n * price
    q = f"I buy {n} notebooks at ${price} each and pay with a ${paid} bill. How much change do I get?"
    t = (
        f"The cost is {n} times {price}. {n} x {price} = {total}. "
        f"The change is {paid} - {total} = {paid - total}. Let me double-check: {total} + {paid - total} = {paid}. Good."
    )
    return q, t, f"You get ${paid - total} in change."


def linear(r: random.Random) -> tuple[str, str, str]:
    a, x, b = r.randint(2, 9), r.randint(-10, 12), r.randint(-20, 20)
    c = a * x + b
    sb = f"+ {b}" if b >= 0 else f"- {-b}"
    q = f"Solve for x: {a}x {sb} = {c}."
    t = (
        f"Subtract {b} from both sides: {a}x = {c} - ({b}) = {c - b}. "
        f"Divide by {a}: x = {c - b} / {a} = {x}. Check: {a} * {x} {sb} = {a * x + b}, which matches {c}."
    )
    return q, t, f"x = {x}"


def percent(r: random.Random) -> tuple[str, str, str]:
    price, pct = r.choice([40, 60, 80, 120, 200, 400]), r.choice([10, 15, 20, 25, 30])
    off = price * pct // 100
    q = f"A jacket costs ${price} and is {pct}% off. What is the sale price?"
    t = (
        f"{pct}% of {price} is {price} * {pct} / 100 = {off}. "
        f"Sale price = {price} - {off} = {price - off}. "
        f"Alternatively {100 - pct}% of {price} = {price * (100 - pct) // 100}, the same."
    )
    return q, t, f"The sale price is ${price - off}."


def speed(r: random.Random) -> tuple[str, str, str]:
    v, h = r.choice([40, 48, 60, 72, 80, 96]), r.choice([2, 3, 4, 5])
    m = r.choice([0, 15, 30, 45])
    dist = v * h + v * m // 60
    q = f"A train travels at {v} km/h for {h} hours and {m} minutes. How far does it go?"
    t = (
        f"Convert the time: {m} minutes is {m}/60 = {m / 60:g} hours, so the time is {h + m / 60:g} hours. "
        f"Distance = speed x time = {v} x {h + m / 60:g}. {v} x {h} = {v * h}, and {v} x {m / 60:g} = {v * m // 60}. "
        f"Total {v * h} + {v * m // 60} = {dist} km."
    )
    return q, t, f"It travels {dist} km."


def sequence(r: random.Random) -> tuple[str, str, str]:
    start, step, n = r.randint(1, 9), r.randint(2, 7), r.randint(6, 15)
    terms = [start + i * step for i in range(4)]
    last = start + (n - 1) * step
    total = n * (start + last) // 2
    q = f"What is the sum of the first {n} terms of {', '.join(map(str, terms))}, ...?"
    t = (
        f"This is arithmetic with first term {start} and difference {step}. "
        f"The {n}th term is {start} + ({n} - 1) * {step} = {last}. "
        f"Sum = n * (first + last) / 2 = {n} * ({start} + {last}) / 2 = {n} * {start + last} / 2 = {total}. "
        f"Hmm, wait: is {n * (start + last)} even? Yes, so the sum is an integer, {total}."
    )
    return q, t, f"The sum is {total}."


def ages(r: random.Random) -> tuple[str, str, str]:
    kid, k = r.randint(4, 12), r.randint(3, 4)
    parent, years = kid * k, r.randint(2, 10)
    q = (
        f"Sam's mother is {k} times as old as Sam. Sam is {kid}. "
        f"How old will the mother be when Sam is {kid + years}?"
    )
    t = (
        f"Mother's age now = {k} x {kid} = {parent}. Sam goes from {kid} to {kid + years}, that is {years} years later. "
        f"Everyone ages the same amount, so the mother will be {parent} + {years} = {parent + years}. "
        f"Not {k} x {kid + years} = {k * (kid + years)}: the ratio changes over time."
    )
    return q, t, f"She will be {parent + years}."


def logic(r: random.Random) -> tuple[str, str, str]:
    names = r.sample(["Ana", "Ben", "Chloe", "Dev", "Eli", "Fay"], 3)
    a, b, c = names
    q = f"{a} is taller than {b}. {c} is shorter than {b}. Who is the tallest, and who is the shortest?"
    t = (
        f"From the first fact: {a} > {b}. From the second: {b} > {c}. "
        f"Chaining them: {a} > {b} > {c}. So {a} is tallest and {c} is shortest. "
        "Is any other order consistent with both facts? No, both comparisons fix the order."
    )
    return q, t, f"{a} is the tallest and {c} is the shortest."


def fractions(r: random.Random) -> tuple[str, str, str]:
    from math import gcd

    a, b, c, d = r.randint(1, 5), r.randint(2, 9), r.randint(1, 5), r.randint(2, 9)
    num, den = a * d + c * b, b * d
    g = gcd(num, den)
    q = f"What is {a}/{b} + {c}/{d}? Give the answer in lowest terms."
    t = (
        f"Common denominator {b} x {d} = {den}. {a}/{b} = {a * d}/{den} and {c}/{d} = {c * b}/{den}. "
        f"Sum = {num}/{den}. The gcd of {num} and {den} is {g}, so it reduces to {num // g}/{den // g}."
    )
    return q, t, f"{num // g}/{den // g}"


TEMPLATES = (shopping, linear, percent, speed, sequence, ages, logic, fractions)


def generate(n: int = 160, seed: int = 0) -> str:
    r = random.Random(seed)
    lines = []
    for i in range(n):
        q, think, answer = TEMPLATES[i % len(TEMPLATES)](r)
        reply = f"<think>\n{think}\n</think>\n\n{answer}"
        lines.append(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": reply}]}))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    (Path(__file__).parent / "reasoning.jsonl").write_text(generate())

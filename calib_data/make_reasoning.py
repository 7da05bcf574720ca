"""Regenerate reasoning.jsonl.gz and reasoning_zh.jsonl.gz: seeded math/reasoning dialogues in the shape R1 distills emit.

Each line is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` where the assistant
turn is ``<think>step-by-step working</think>`` followed by a short answer, so the calibration text
looks like what a reasoning distill reads and writes. The problems are generated from templates
written for dsq (CC0); run ``python make_reasoning.py`` to rebuild both files byte for byte. Every number in a
working is computed by the template, so the arithmetic is exact.
"""

from __future__ import annotations

import gzip
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


def euclid(r: random.Random) -> tuple[str, str, str]:
    g = r.randint(2, 24)
    a, b = g * r.randint(5, 60), g * r.randint(3, 40)
    if a < b:
        a, b = b, a
    q = f"Find the greatest common divisor of {a} and {b}."
    steps, x, y = [], a, b
    while y:
        steps.append(f"{x} = {x // y} x {y} + {x % y}")
        x, y = y, x % y
    t = (
        "Use the Euclidean algorithm: divide, keep the remainder, repeat. "
        + ". ".join(steps)
        + f". The remainder reached 0, so the last non-zero remainder, {x}, is the gcd. "
        f"Check: {a} / {x} = {a // x} and {b} / {x} = {b // x}, both whole numbers."
    )
    return q, t, f"gcd({a}, {b}) = {x}"


def binary(r: random.Random) -> tuple[str, str, str]:
    n = r.randint(19, 1000)
    q = f"Write {n} in binary."
    steps, m, bits = [], n, []
    while m:
        steps.append(f"{m} / 2 = {m // 2} remainder {m % 2}")
        bits.append(str(m % 2))
        m //= 2
    b = "".join(reversed(bits))
    check = " + ".join(f"{1 << i}" for i, c in enumerate(reversed(b)) if c == "1")
    t = (
        "Divide by 2 repeatedly and collect the remainders. " + "; ".join(steps)
        + f". Reading the remainders from last to first gives {b}. Check: {check} = {n}."
    )
    return q, t, f"{n} in binary is {b}."


def prime(r: random.Random) -> tuple[str, str, str]:
    n = r.choice([r.randint(50, 400) * 2 + 1, r.choice([101, 127, 131, 149, 173, 197, 211, 223, 251, 263, 293, 307])])
    q = f"Is {n} a prime number?"
    root = int(n**0.5)
    tried = []
    for p in range(3, root + 1, 2):
        if n % p == 0:
            tried.append(f"{n} / {p} = {n // p} exactly")
            t = (
                f"{n} is odd, so 2 does not divide it. I only need to test odd divisors up to sqrt({n}), about {root}. "
                + "; ".join(tried) + f". So {n} = {p} x {n // p}, which is composite."
            )
            return q, t, f"No: {n} = {p} x {n // p}."
        tried.append(f"{p} leaves {n % p}")
    t = (
        f"{n} is odd, so 2 does not divide it. Test odd divisors up to sqrt({n}), about {root}: "
        + "; ".join(tried) + f". None divides {n}, so it is prime."
    )
    return q, t, f"Yes, {n} is prime."


def room(r: random.Random) -> tuple[str, str, str]:
    w, h, tile = r.randint(3, 12), r.randint(3, 12), r.choice([2, 4, 5])
    q = f"A floor is {w} m by {h} m. Tiles come in packs that cover {tile} square metres. How many packs do I need, and how long is the skirting board around the room?"
    area, packs = w * h, -(-w * h // tile)
    t = (
        f"Area = {w} x {h} = {area} square metres. Packs: {area} / {tile} = {area / tile:g}, "
        f"and a part pack must be bought whole, so round up to {packs}. "
        f"The skirting follows the perimeter: 2 x ({w} + {h}) = 2 x {w + h} = {2 * (w + h)} m."
    )
    return q, t, f"{packs} packs and {2 * (w + h)} m of skirting board."


def multiply(r: random.Random) -> tuple[str, str, str]:
    a, b = r.randint(12, 99), r.randint(102, 999)
    h, rest = b // 100 * 100, b % 100
    q = f"Compute {a} x {b} without a calculator."
    t = (
        f"Split {b} into {h} + {rest}. {a} x {h} = {a * h}. {a} x {rest} = {a * rest}. "
        f"Add: {a * h} + {a * rest} = {a * b}. Rough check: {a} x {round(b, -2)} is about {a * round(b, -2)}, close enough."
    )
    return q, t, f"{a * b}"


def system(r: random.Random) -> tuple[str, str, str]:
    x, y = r.randint(-6, 9), r.randint(-6, 9)
    a, b = r.randint(1, 5), r.randint(1, 5)
    c, d = r.randint(1, 5), -r.randint(1, 5)
    e, f = a * x + b * y, c * x + d * y
    q = f"Solve the system: {a}x + {b}y = {e} and {c}x - {-d}y = {f}."
    det = a * d - b * c
    t = (
        f"Eliminate y: multiply the first equation by {-d} and the second by {b}. "
        f"That gives {-d * a}x + {-d * b}y = {-d * e} and {b * c}x - {b * -d}y = {b * f}. "
        f"Adding: {-d * a + b * c}x = {-d * e + b * f}, so x = {x}. "
        f"Substitute into the first: {a} x {x} + {b}y = {e}, so {b}y = {e - a * x} and y = {y}. "
        f"Check the second: {c} x {x} - {-d} x {y} = {c * x + d * y}. The determinant {det} is non-zero, so this is the only solution."
    )
    return q, t, f"x = {x}, y = {y}"


def quadratic(r: random.Random) -> tuple[str, str, str]:
    p, s = r.randint(-9, 9), r.randint(-9, 9)
    b, c = -(p + s), p * s
    sb = f"+ {b}x" if b >= 0 else f"- {-b}x"
    sc = f"+ {c}" if c >= 0 else f"- {-c}"
    q = f"Find the roots of x^2 {sb} {sc} = 0."
    t = (
        f"Look for two numbers whose product is {c} and whose sum is {-b}. {p} and {s} work: "
        f"{p} x {s} = {c} and {p} + {s} = {p + s}. So the polynomial factors as (x - ({p}))(x - ({s})). "
        f"Discriminant check: {b}^2 - 4 x {c} = {b * b - 4 * c}, a perfect square ({abs(p - s)}^2), consistent with integer roots."
    )
    return q, t, f"x = {p} or x = {s}" if p != s else f"x = {p} (a double root)"


def marbles(r: random.Random) -> tuple[str, str, str]:
    from math import gcd

    red, blue = r.randint(2, 9), r.randint(2, 9)
    n = red + blue
    num, den = red * (red - 1), n * (n - 1)
    g = gcd(num, den)
    q = f"A bag holds {red} red and {blue} blue marbles. Two are drawn without putting the first back. What is the probability both are red?"
    t = (
        f"First draw: {red} red out of {n}, probability {red}/{n}. Then {red - 1} red remain out of {n - 1}: {red - 1}/{n - 1}. "
        f"Multiply: {red} x {red - 1} / ({n} x {n - 1}) = {num}/{den}. Divide top and bottom by {g}: {num // g}/{den // g}."
    )
    return q, t, f"{num // g}/{den // g}"


def stats(r: random.Random) -> tuple[str, str, str]:
    xs = sorted(r.randint(1, 60) for _ in range(r.choice([5, 7, 9])))
    xs_shown = r.sample(xs, len(xs))
    total, n = sum(xs), len(xs)
    q = f"Find the mean and the median of {', '.join(map(str, xs_shown))}."
    t = (
        f"Sum: {' + '.join(map(str, xs_shown))} = {total}. There are {n} values, so the mean is {total}/{n} = {total / n:.4g}. "
        f"Sorted: {', '.join(map(str, xs))}. With {n} values the median is value number {(n + 1) // 2}, which is {xs[n // 2]}."
    )
    return q, t, f"mean {total / n:.4g}, median {xs[n // 2]}"


TEMPLATES = (shopping, linear, percent, speed, sequence, ages, logic, fractions, euclid, binary, prime, room,
             multiply, system, quadratic, marbles, stats)


# -- Chinese problems (DeepSeek distills are bilingual and often reason in Chinese) ----------------------------
def zh_shopping(r: random.Random) -> tuple[str, str, str]:
    n, price = r.randint(3, 9), r.randint(2, 15)
    total = n * price
    q = f"小明买了{n}本笔记本，每本{price}元，付了100元，应该找回多少钱？"
    t = f"先算总价：{n} × {price} = {total}元。再算找零：100 - {total} = {100 - total}元。验算：{total} + {100 - total} = 100，没错。"
    return q, t, f"应找回{100 - total}元。"


def zh_linear(r: random.Random) -> tuple[str, str, str]:
    a, x, b = r.randint(2, 9), r.randint(-10, 12), r.randint(-20, 20)
    c = a * x + b
    sb = f"+ {b}" if b >= 0 else f"- {-b}"
    q = f"解方程：{a}x {sb} = {c}。"
    t = f"两边同时减去{b}：{a}x = {c} - ({b}) = {c - b}。两边除以{a}：x = {c - b} ÷ {a} = {x}。代回检验：{a} × {x} {sb} = {c}，成立。"
    return q, t, f"x = {x}"


def zh_discount(r: random.Random) -> tuple[str, str, str]:
    price, zhe = r.choice([80, 120, 150, 200, 240, 360]), r.choice([6, 7, 8, 9])
    sale = price * zhe // 10
    q = f"一件外套原价{price}元，现在打{zhe}折出售，便宜了多少钱？"
    t = f"打{zhe}折就是按原价的{zhe * 10}%出售：{price} × {zhe}/10 = {sale}元。便宜的钱数：{price} - {sale} = {price - sale}元。也可以直接算 {price} × {10 - zhe}/10 = {price * (10 - zhe) // 10}元，结果一样。"
    return q, t, f"便宜了{price - sale}元，现价{sale}元。"


def zh_travel(r: random.Random) -> tuple[str, str, str]:
    v1, v2, hours = r.randint(40, 70), r.randint(50, 90), r.randint(2, 5)
    d = (v1 + v2) * hours
    q = f"甲乙两地相距{d}千米，一辆货车和一辆客车同时从两地相向而行，货车每小时行{v1}千米，客车每小时行{v2}千米，几小时后相遇？"
    t = f"相向而行，两车每小时共行 {v1} + {v2} = {v1 + v2} 千米。相遇时间 = 总路程 ÷ 速度和 = {d} ÷ {v1 + v2} = {hours} 小时。验算：{v1 + v2} × {hours} = {d}。"
    return q, t, f"{hours}小时后相遇。"


def zh_chicken(r: random.Random) -> tuple[str, str, str]:
    chickens, rabbits = r.randint(3, 30), r.randint(3, 30)
    heads, legs = chickens + rabbits, 2 * chickens + 4 * rabbits
    q = f"笼子里有鸡和兔，从上面数有{heads}个头，从下面数有{legs}只脚。鸡和兔各有几只？"
    t = (
        f"假设全是鸡，应该有 {heads} × 2 = {2 * heads} 只脚，比实际少 {legs} - {2 * heads} = {legs - 2 * heads} 只。"
        f"每把一只鸡换成兔，脚数多2只，所以兔有 {legs - 2 * heads} ÷ 2 = {rabbits} 只，鸡有 {heads} - {rabbits} = {chickens} 只。"
        f"检验：{chickens} × 2 + {rabbits} × 4 = {legs}，对的。"
    )
    return q, t, f"鸡{chickens}只，兔{rabbits}只。"


def zh_fraction(r: random.Random) -> tuple[str, str, str]:
    from math import gcd

    a, b, c, d = r.randint(1, 5), r.randint(2, 9), r.randint(1, 5), r.randint(2, 9)
    num, den = a * d + c * b, b * d
    g = gcd(num, den)
    q = f"计算 {a}/{b} + {c}/{d}，结果化成最简分数。"
    t = f"通分，公分母是 {b} × {d} = {den}。{a}/{b} = {a * d}/{den}，{c}/{d} = {c * b}/{den}。相加得 {num}/{den}。{num} 和 {den} 的最大公约数是 {g}，约分后是 {num // g}/{den // g}。"
    return q, t, f"{num // g}/{den // g}"


def zh_gcd(r: random.Random) -> tuple[str, str, str]:
    g = r.randint(2, 24)
    a, b = g * r.randint(5, 60), g * r.randint(3, 40)
    if a < b:
        a, b = b, a
    steps, x, y = [], a, b
    while y:
        steps.append(f"{x} = {x // y} × {y} + {x % y}")
        x, y = y, x % y
    q = f"用辗转相除法求{a}和{b}的最大公约数。"
    t = "辗转相除：" + "；".join(steps) + f"。余数为0，最后一个非零余数{x}就是最大公约数。检验：{a} ÷ {x} = {a // x}，{b} ÷ {x} = {b // x}，都能整除。"
    return q, t, f"最大公约数是{x}。"


def zh_work(r: random.Random) -> tuple[str, str, str]:
    per_day, days, extra = r.randint(20, 60), r.randint(5, 12), r.randint(5, 20)
    total = per_day * days
    faster = per_day + extra
    q = f"一批零件共{total}个，原计划每天做{per_day}个。实际每天多做{extra}个，实际需要多少天完成？能提前几天？"
    whole = -(-total // faster)
    t = (
        f"原计划天数：{total} ÷ {per_day} = {days}天。实际每天做 {per_day} + {extra} = {faster} 个。"
        f"{total} ÷ {faster} = {total / faster:.3g}，不足一天也要算一天，所以要{whole}天。提前 {days} - {whole} = {days - whole} 天。"
    )
    return q, t, f"实际需要{whole}天，提前{days - whole}天。"


ZH_TEMPLATES = (zh_shopping, zh_linear, zh_discount, zh_travel, zh_chicken, zh_fraction, zh_gcd, zh_work)


def generate(n: int = 510, seed: int = 0, templates: tuple = TEMPLATES) -> str:
    """``n`` dialogues, template ``i mod len(templates)`` for dialogue ``i``, numbers from ``random.Random(seed)``."""
    r = random.Random(seed)
    lines = []
    for i in range(n):
        q, think, answer = templates[i % len(templates)](r)
        reply = f"<think>\n{think}\n</think>\n\n{answer}"
        lines.append(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": reply}]},
                                ensure_ascii=False))
    return "\n".join(lines) + "\n"


OUTPUTS = {  # file -> (count, seed, templates)
    "reasoning.jsonl.gz": (510, 0, TEMPLATES),
    "reasoning_zh.jsonl.gz": (320, 1, ZH_TEMPLATES),
}


def build(name: str) -> bytes:
    """The gzip bytes of one output (mtime 0, so the file is the same on every run)."""
    n, seed, templates = OUTPUTS[name]
    return gzip.compress(generate(n, seed, templates).encode("utf-8"), compresslevel=9, mtime=0)


if __name__ == "__main__":
    for name in OUTPUTS:
        (Path(__file__).parent / name).write_bytes(build(name))

"""Generated arithmetic questions, a share of them answered wrongly on purpose (label noise)."""

from __future__ import annotations

import random
from typing import Any

_WRONG_OFFSETS = (-10, -2, -1, 1, 2, 10)


def _question(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"{a} * {b}", a * b
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return (f"{a} + {b}", a + b) if op == "+" else (f"{a} - {b}", a - b)


def arithmetic_records(
    rng: random.Random, n: int, noise_rate: float = 0.25, exclude: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """``n`` distinct questions ``"Question: What is a op b?\\nAnswer:"`` → ``" <answer>"``.

    Each answer is wrong (off by one of ±1, ±2, ±10) with probability ``noise_rate``; the
    record says so in ``wrong_answer`` and keeps ``correct_answer``. Questions whose text is in
    ``exclude`` are not generated (used to keep target questions out of the stream).
    """
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
    seen = set(exclude)
    out = []
    while len(out) < n:
        expr, answer = _question(rng)
        prompt = f"Question: What is {expr}?\nAnswer:"
        if prompt in seen:
            continue
        seen.add(prompt)
        wrong = rng.random() < noise_rate
        given = answer + rng.choice(_WRONG_OFFSETS) if wrong else answer
        out.append(
            {
                "id": f"arithmetic/{expr.replace(' ', '')}",
                "origin": "generated",
                "prompt": prompt,
                "response": f" {given}",
                "generated": True,
                "wrong_answer": wrong,
                "correct_answer": answer,
            }
        )
    return out

"""Numeric flag types the scripts share (argparse `type=`), checked when the command line is parsed.

A type such as `positive_int` refuses a value before anything runs (no data read, no model loaded), so
`--epochs 0` or `--warmup -1` never reach a loop that silently does nothing or a traceback deep in a
library. retrieval/errors.py Parser prints the refusal as the one line `error: --flag: <fault>`.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable


def _number(kind: Callable[[str], float], text: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
            from None


def at_least(minimum: int, meaning: str = "") -> Callable[[str], int]:
    """An int type refusing values below `minimum`; `meaning` says what the smallest value means."""
    def parse(text: str) -> int:
        value = int(_number(int, text))
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}{meaning}")
        return value
    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)


def fraction(text: str) -> float:
    """A float in [0, 1] (a share of something, e.g. the warm-up steps)."""
    value = _number(float, text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be a fraction between 0 and 1")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (a learning rate, a temperature)."""
    value = _number(float, text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a number > 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (weight decay, dropout)."""
    value = _number(float, text)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a number >= 0")
    return value


def probability(text: str) -> float:
    """A float in [0, 1) (a dropout rate: 1 would drop everything)."""
    value = _number(float, text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0 and < 1")
    return value


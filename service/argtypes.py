"""Argument types shared by the ``icr`` subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from service.store.contract import CLICK_LABELS


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def click_reach(text: str) -> tuple[str, float]:
    """``SIGN=VOXELS``: a click sign (foreground or background) and its reach sigma, a number > 0."""
    sign, _, sigma = text.partition("=")
    if sign not in CLICK_LABELS:
        raise argparse.ArgumentTypeError(f"expected SIGN=VOXELS with SIGN one of {', '.join(CLICK_LABELS)}, got {text}")
    return sign, positive_float(sigma)


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An argument type for integers from ``low`` to ``high``, both included."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer {low}-{high}, got {text}")
        return value

    return parse

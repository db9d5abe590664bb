"""Greedy CTC decoding and edit distance for the OCR reference model (no torch: scripts read models with it)."""

from __future__ import annotations

import numpy as np


def greedy_decode(logits: np.ndarray) -> list[list[int]]:
    """Best path: argmax per column, repeats merged, blanks (0) dropped."""
    best = logits.argmax(-1)
    keep = np.ones_like(best, dtype=bool)
    keep[:, 1:] = best[:, 1:] != best[:, :-1]
    keep &= best != 0
    return [row[mask].tolist() for row, mask in zip(best, keep)]


def edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]

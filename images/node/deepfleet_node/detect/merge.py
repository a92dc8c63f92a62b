"""Pairing two tools' lists of the same GPUs, so one tool's details can fill another's."""

from __future__ import annotations

from collections.abc import Iterable


def _match(primary: list[dict], secondary: list[dict], keys: Iterable[str]) -> dict[int, dict]:
    """Pair entries of two tools' GPU lists by the first key unique on both sides."""
    for key in keys:
        left = [p.get(key) for p in primary]
        right = [s.get(key) for s in secondary]
        if None in left or len(set(left)) != len(left):
            continue
        right_known = [r for r in right if r is not None]
        if len(set(right_known)) != len(right_known):
            continue
        by_key = {s.get(key): s for s in secondary if s.get(key) is not None}
        pairs = {i: by_key[k] for i, k in enumerate(left) if k in by_key}
        if pairs:
            return pairs
    if len(primary) == len(secondary):
        return dict(enumerate(secondary))
    return {}

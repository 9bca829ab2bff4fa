"""Pass 4a — selection: which downstream layers each block's auxiliary net copies, and how many.

The rules are the AugLocal paper's (ICLR 2024), with the reference code's own arithmetic:
Python ``round`` (half to even) and float division, so results match it exactly.
"""

from __future__ import annotations

__all__ = ["TAILS", "select_layers", "pyramid_depths", "apply_tail"]

TAILS = ("exact", "reference")  # what apply_tail does with the last blocks


def select_layers(last_layer: int, num_layers: int, depth: int) -> list[int]:
    """Layers copied into the aux net of a block ending at ``last_layer`` (0-based, L layers).

    Uniform selection: ``j_t = round(l + t·(L−l−1)/d)`` for t = 1..d, so the last pick is always
    layer L−1; when ``d ≥ L−1−l`` every later layer is taken.

    Example:
        >>> select_layers(0, 16, 3)
        [5, 10, 15]
    """
    last, n = last_layer, num_layers
    if depth <= 0 or last >= n - 1:
        return []
    if depth >= n - 1 - last:
        return list(range(last + 1, n))
    return [round(last + t * (n - last - 1) / depth) for t in range(1, depth + 1)]


def pyramid_depths(num_aux: int, depth: int, tau: float, min_depth: int = 1) -> list[int]:
    """Depth of each of ``num_aux`` aux nets, decaying linearly from ``depth`` (pyramidal depth).

    ``d_i = max(d_min, round(d·(1 − i·τ/(M−2)) + d_min·i·τ/(M−2)))`` with M−2 = num_aux − 1;
    τ = 0 keeps every depth at d. A depth of 0 stays 0 (aux net = head copy only).

    Example:
        >>> pyramid_depths(12, 3, 0.5)
        [3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2]
    """
    if depth <= 0:
        return [max(depth, 0)] * num_aux
    if num_aux <= 1 or tau == 0:
        return [depth] * num_aux
    span = num_aux - 1
    return [
        max(min_depth, round(depth * (1 - i * tau / span) + min_depth * i * tau / span))
        for i in range(num_aux)
    ]


def apply_tail(blocks: list[list[int]], depth: int, tail: str) -> list[list[int]]:
    """``exact``: keep the K blocks. ``reference``: as the paper's code (M = K − d), merge the last
    d+1 blocks so the final block trains with the model's own head (at least one block remains)."""
    if tail == "exact" or depth <= 0:
        return [list(b) for b in blocks]
    keep = max(1, len(blocks) - depth)
    merged = [x for b in blocks[keep - 1:] for x in b]
    return [list(b) for b in blocks[: keep - 1]] + [merged]

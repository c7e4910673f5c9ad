"""A hand-written 5x7 bitmap font for the digits, two variants each.

Drawn by hand rather than rendered from a system font so that the `read` task's images are identical on
every machine. The second variant of each digit (open 4, flat-topped 3, plain 0, ...) gives the held-out
test set combinations the training set has not seen, without adding pixel noise.
"""

from __future__ import annotations

from functools import cache

import numpy as np

GLYPH_ROWS = 7
GLYPH_COLS = 5

# DIGIT_GLYPHS[d][v] is variant v of digit d, top row first; "#" is ink.
DIGIT_GLYPHS: dict[int, tuple[tuple[str, ...], ...]] = {
    0: (
        (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
        (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    ),
    1: (
        ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
        ("...#.", "..##.", ".#.#.", "...#.", "...#.", "...#.", "...#."),
    ),
    2: (
        (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
        (".###.", "#...#", "....#", "..##.", ".#...", "#....", "#####"),
    ),
    3: (
        ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
        (".###.", "#...#", "....#", "..##.", "....#", "#...#", ".###."),
    ),
    4: (
        ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
        ("#...#", "#...#", "#...#", "#####", "....#", "....#", "....#"),
    ),
    5: (
        ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
        ("#####", "#....", "#....", "####.", "....#", "....#", "####."),
    ),
    6: (
        ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
        (".###.", "#...#", "#....", "####.", "#...#", "#...#", ".###."),
    ),
    7: (
        ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
        ("#####", "....#", "....#", "...#.", "..#..", "..#..", "..#.."),
    ),
    8: (
        (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
        (".###.", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", ".###."),
    ),
    9: (
        (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
        (".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."),
    ),
}

N_VARIANTS = 2


@cache
def glyph(digit: int, variant: int = 0) -> np.ndarray:
    """Return the (7, 5) boolean ink mask of `digit` in `variant`; read-only."""
    if digit not in DIGIT_GLYPHS:
        raise ValueError(f"digit must be 0-9, got {digit!r}")
    variants = DIGIT_GLYPHS[digit]
    if not 0 <= variant < len(variants):
        raise ValueError(f"variant must be in 0..{len(variants) - 1} for digit {digit}, got {variant!r}")
    mask = np.array([[c == "#" for c in row] for row in variants[variant]], dtype=bool)  # (7, 5)
    mask.setflags(write=False)
    return mask

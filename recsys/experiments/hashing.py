"""The assignment hash, as specified in docs/experiments.md ("The hash").

Every function here has a scalar reference form (plain Python ints, easy to port) and the
assignment hot path uses the vectorised form (:func:`mix64_array`) over all layers at once.
Both are checked against ``recsys/experiments/hash_vectors.json``.

    key64(s)      = first 8 bytes of SHA-256(UTF-8(s)), big-endian, as an unsigned 64-bit int
    mix64(z)      = the splitmix64 finaliser (xor-shift 30, multiply, xor-shift 27, multiply,
                    xor-shift 31; arithmetic mod 2**64)
    bucket        = mix64(key64(user_id) XOR key64("layer:" + layer_salt)) mod num_buckets
    holdout       = mix64(key64(user_id) XOR key64("holdout:" + holdout_salt)) mod num_buckets
    arm point     = mix64(key64(user_id) XOR key64("experiment:" + salt + "/" + epoch)) >> 32
    arm           = the first arm j whose threshold t_j > point, where
                    t_j = floor(2**32 * (w_0 + ... + w_j) / W) in float64, and t_last = 2**32
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

U64 = np.uint64
MASK64 = (1 << 64) - 1
MIX_MUL_1 = 0xBF58476D1CE4E5B9
MIX_MUL_2 = 0x94D049BB133111EB
POINT_BITS = 32
POINT_SPAN = 1 << POINT_BITS
"""Arm points are the top 32 bits of the arm hash: integers in [0, 2**32)."""

LAYER_DOMAIN = "layer:"
HOLDOUT_DOMAIN = "holdout:"
EXPERIMENT_DOMAIN = "experiment:"

U64Array = npt.NDArray[np.uint64]


def key64(text: str) -> int:
    """The first 8 bytes of SHA-256 over the UTF-8 bytes of ``text``, big-endian."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit ints with full avalanche."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX_MUL_1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_MUL_2) & MASK64
    return z ^ (z >> 31)


def uint64_constant(value: int) -> U64Array:
    """``value`` as a 0-d uint64 array: an operand numpy broadcasts without the conversion a
    numpy scalar costs on every call (~0.3 µs, a third of a ufunc call on 100 elements)."""
    return np.array(value, dtype=U64)


_SHIFT_30 = uint64_constant(30)
_SHIFT_27 = uint64_constant(27)
_SHIFT_31 = uint64_constant(31)
_MUL_1 = uint64_constant(MIX_MUL_1)
_MUL_2 = uint64_constant(MIX_MUL_2)


def mix64_array(z: U64Array) -> U64Array:
    """:func:`mix64` over a uint64 array, in place (numpy uint64 arithmetic wraps mod 2**64)."""
    tmp = np.right_shift(z, _SHIFT_30)
    z ^= tmp
    z *= _MUL_1
    np.right_shift(z, _SHIFT_27, out=tmp)
    z ^= tmp
    z *= _MUL_2
    np.right_shift(z, _SHIFT_31, out=tmp)
    z ^= tmp
    return z


def user_key(user_id: str) -> int:
    return key64(user_id)


def layer_key(layer_salt: str) -> int:
    return key64(LAYER_DOMAIN + layer_salt)


def holdout_key(holdout_salt: str) -> int:
    return key64(HOLDOUT_DOMAIN + holdout_salt)


def experiment_key(salt: str, epoch: int) -> int:
    return key64(f"{EXPERIMENT_DOMAIN}{salt}/{epoch}")


def bucket(user_id: str, salt_key: int, num_buckets: int) -> int:
    """The bucket of ``user_id`` in a layer (or the holdout) whose salt key is ``salt_key``."""
    return mix64(user_key(user_id) ^ salt_key) % num_buckets


def arm_point(user_id: str, experiment_salt_key: int) -> int:
    return mix64(user_key(user_id) ^ experiment_salt_key) >> (64 - POINT_BITS)


def arm_thresholds(weights: Sequence[float]) -> list[int]:
    """Cumulative integer thresholds in (0, 2**32] for arms with these (positive) weights.

    Sums are float64, left to right, so any IEEE-754 language reproduces them exactly.
    """
    if not weights:
        raise ValueError("arm_thresholds: expected at least one weight")
    total = 0.0
    for w in weights:
        total += float(w)
    thresholds: list[int] = []
    running = 0.0
    for w in weights[:-1]:
        running += float(w)
        thresholds.append(min(math.floor(running / total * POINT_SPAN), POINT_SPAN))
    thresholds.append(POINT_SPAN)
    return thresholds


def arm_index(point: int, thresholds: Sequence[int]) -> int:
    """The first arm whose threshold is above ``point``."""
    for j, t in enumerate(thresholds):
        if point < t:
            return j
    raise ValueError(f"arm point {point}: expected < {thresholds[-1]}")

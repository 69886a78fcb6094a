"""Great-circle distances, vectorised: one code path for ranking features and retrieval filters."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

EARTH_RADIUS_KM = 6371.0088

ArrayLike = npt.NDArray[np.floating] | float


def haversine_km(
    lat1: ArrayLike, lon1: ArrayLike, lat2: ArrayLike, lon2: ArrayLike
) -> npt.NDArray[np.float64]:
    """Distance in km between points given in degrees; broadcasts like numpy."""
    p1 = np.radians(lat1)
    p2 = np.radians(lat2)
    dp = p2 - p1
    dl = np.radians(np.asarray(lon2, dtype=np.float64) - np.asarray(lon1, dtype=np.float64))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return np.asarray(2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0))))


BOUNDARY_TOLERANCE = 1e-12
"""Half-chord-squared values this close to a radius's bound (about a centimetre at 8 km; the
two computations agree to within ~1e-15) are decided by :func:`haversine_km` itself."""


def unit_vectors(lat: ArrayLike, lon: ArrayLike) -> npt.NDArray[np.float64]:
    """Points given in degrees as unit vectors (x, y, z), shape ``broadcast(lat, lon) + (3,)``."""
    p = np.radians(np.asarray(lat, dtype=np.float64))
    lam = np.radians(np.asarray(lon, dtype=np.float64))
    cos_p = np.cos(p)
    x, y, z = np.broadcast_arrays(cos_p * np.cos(lam), cos_p * np.sin(lam), np.sin(p))
    return np.stack([x, y, z], axis=-1)


def half_chord_squared_limit(radius_km: ArrayLike) -> npt.NDArray[np.float64]:
    """The bound on ``(1 - u.v) / 2`` (the haversine of the angle between unit vectors u and
    v) that is equivalent to ``haversine_km(...) <= radius_km``."""
    angle = np.minimum(np.asarray(radius_km, dtype=np.float64) / (2 * EARTH_RADIUS_KM), np.pi / 2)
    return np.asarray(np.sin(angle) ** 2)

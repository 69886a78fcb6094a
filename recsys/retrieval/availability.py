"""What can be served right now: an immutable snapshot, compiled once per control-plane change.

The catalogue says which items are in stock and which restaurants are open; ops switch further
items and restaurants off through the ``availability`` document::

    {"skus_off": [12, 40017], "restaurants_off": [3]}

A snapshot holds the resulting ``item_mask`` and a prebuilt FAISS bitmap selector, so a search
filters inside FAISS without any per-request work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from recsys.types import BoolArray, Int64Array
from recsys.world import Catalogue

DOCUMENT_FIELDS = ("skus_off", "restaurants_off")
VERSION_DIGITS = 12


class AvailabilitySelector:
    """An item mask packed into the bitmap FAISS's ``IDSelectorBitmap`` reads.

    FAISS selects id ``i`` iff bit ``i % 8`` of byte ``i // 8`` is set: little bit order. The
    Python wrapper keeps a reference to the packed bytes, and this object keeps the selector, so
    the memory FAISS reads lives as long as the snapshot does.
    """

    def __init__(self, mask: BoolArray) -> None:
        self._wrap(np.packbits(mask, bitorder="little"), int(mask.shape[0]))

    @classmethod
    def from_bitmap(cls, bitmap: npt.NDArray[np.uint8], size: int) -> AvailabilitySelector:
        """A selector over ``size`` ids from bits already packed in FAISS's order."""
        if bitmap.dtype != np.uint8 or bitmap.shape != ((size + 7) // 8,):
            raise ValueError(
                f"bitmap: expected {(size + 7) // 8} uint8 bytes for {size} ids, "
                f"got {bitmap.dtype} of shape {bitmap.shape}"
            )
        selector = cls.__new__(cls)
        selector._wrap(bitmap, size)
        return selector

    def _wrap(self, bitmap: npt.NDArray[np.uint8], size: int) -> None:
        self.size = size
        self.bitmap: npt.NDArray[np.uint8] = np.ascontiguousarray(bitmap)
        self.bitmap.flags.writeable = False
        # The wrapper's one-argument form (the stubs only know the C++ one) keeps a reference.
        make_selector: Any = faiss.IDSelectorBitmap
        self.faiss_selector: faiss.IDSelector = make_selector(self.bitmap)


def _ids(doc: Mapping[str, Any], name: str, limit: int) -> Int64Array:
    values = doc.get(name, [])
    if not isinstance(values, list | tuple):
        raise ValueError(
            f"availability.{name}: expected a list of ids, got {type(values).__name__}"
        )
    for v in values:  # control-plane validation, once per document: not a serving path
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ValueError(f"availability.{name}: {v!r} is not an integer id")
    ids = np.asarray(values, dtype=np.int64).reshape(-1)
    bad = ids[(ids < 0) | (ids >= limit)]
    if bad.size:
        raise ValueError(
            f"availability.{name}: id {int(bad[0])} is out of range, expected 0..{limit - 1}"
        )
    return ids


@dataclass(frozen=True)
class Availability:
    """Items that may be served: in stock, restaurant open, not switched off by ops."""

    item_mask: BoolArray
    """[N] True where the item may be served (read-only)."""
    version: str
    """Content hash of the mask: two documents that switch off the same items share it."""
    skus_off: Int64Array
    restaurants_off: Int64Array
    selector: AvailabilitySelector = field(repr=False)

    @classmethod
    def from_document(
        cls, catalogue: Catalogue, doc: Mapping[str, Any] | None = None
    ) -> Availability:
        """Validate ``doc`` against ``catalogue`` and compile the snapshot; ValueError if bad."""
        doc = {} if doc is None else doc
        if not isinstance(doc, Mapping):
            raise ValueError(f"availability: expected a JSON object, got {type(doc).__name__}")
        unknown = sorted(set(doc) - set(DOCUMENT_FIELDS))
        if unknown:
            raise ValueError(
                f"availability: unknown field {unknown[0]!r}, expected only {list(DOCUMENT_FIELDS)}"
            )
        skus_off = _ids(doc, "skus_off", catalogue.n_items)
        restaurants_off = _ids(doc, "restaurants_off", catalogue.n_restaurants)

        restaurant_ok = np.array(catalogue.restaurant_is_open, dtype=np.bool_)
        restaurant_ok[restaurants_off] = False
        mask = np.array(catalogue.item_available, dtype=np.bool_)
        mask &= restaurant_ok[catalogue.item_restaurant]
        mask[skus_off] = False
        mask.flags.writeable = False

        selector = AvailabilitySelector(mask)
        version = hashlib.sha256(selector.bitmap.tobytes()).hexdigest()[:VERSION_DIGITS]
        return cls(
            item_mask=mask,
            version=version,
            skus_off=np.unique(skus_off),
            restaurants_off=np.unique(restaurants_off),
            selector=selector,
        )

    @property
    def n_available(self) -> int:
        return int(np.count_nonzero(self.item_mask))

    def document(self) -> dict[str, list[int]]:
        """The switches as an availability document (to carry them over to another catalogue)."""
        return {
            "skus_off": self.skus_off.tolist(),
            "restaurants_off": self.restaurants_off.tolist(),
        }

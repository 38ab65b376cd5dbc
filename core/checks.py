"""Validation helpers shared by the data model and the readers.

Every check raises `ValueError` with a message that names where the value came from (`source`,
usually a file path or "Trace"), the field, and the offending value, so the CLI can print it as is.
"""

from __future__ import annotations

import numpy as np

# Exporters write a row per model layer and the runtime builds every layer, so a layer count from a
# corrupt file must stop here, not at an allocation. No released model comes near 1000 layers.
MAX_MODEL_LAYERS = 10_000


def check_array(
    source: str,
    field: str,
    value: object,
    *,
    ndim: int,
    kind: str,
    shape: tuple[int | None, ...] | None = None,
) -> np.ndarray:
    """Return `value` as a numpy array after checking rank, dtype kind ('f' float, 'i' integer) and shape.

    `shape` entries that are None are free; integer entries must match exactly.
    """
    if not isinstance(value, np.ndarray):
        try:
            value = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}: field '{field}' is not a numeric array ({exc})") from None
    if value.ndim != ndim:
        raise ValueError(f"{source}: field '{field}' must have {ndim} dimensions, got shape {list(value.shape)}")
    if kind == "f" and value.dtype.kind not in "fiu":
        raise ValueError(f"{source}: field '{field}' must be numeric, got dtype {value.dtype}")
    if kind == "i" and value.dtype.kind not in "iu":
        raise ValueError(f"{source}: field '{field}' must be integers, got dtype {value.dtype}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, value.shape)):
            if want is not None and want != got:
                raise ValueError(
                    f"{source}: field '{field}' has shape {list(value.shape)}, expected {want} along axis {axis}"
                )
    return value


def check_counts(source: str, field: str, counts: np.ndarray) -> np.ndarray:
    """Counts must be finite and non-negative; returns them as float64."""
    counts = np.asarray(counts, dtype=np.float64)
    bad = ~np.isfinite(counts)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{source}: field '{field}' holds {counts[where]} at index {list(where)} (NaN/inf)")
    if (counts < 0).any():
        where = tuple(int(i) for i in np.argwhere(counts < 0)[0])
        raise ValueError(f"{source}: field '{field}' holds negative count {counts[where]} at index {list(where)}")
    return counts


def check_range(source: str, field: str, values: np.ndarray, low: int, high: int) -> None:
    """All values must lie in [low, high)."""
    if values.size == 0:
        return
    bad = (values < low) | (values >= high)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{source}: field '{field}' holds {int(values[where])} at index {list(where)}, outside [{low}, {high})"
        )


def check_positive_int(source: str, field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{source}: field '{field}' must be a positive integer, got {value!r}")
    return int(value)


def check_layers(source: str, layers: object, num_layers: int, num_model_layers: object) -> np.ndarray:
    """[num_layers] int64 model layer ids: non-negative, increasing, below `num_model_layers` (when
    given, an integer of at most MAX_MODEL_LAYERS). The one check of a trace's and a placement's layers."""
    out = check_array(source, "layers", layers, ndim=1, kind="i", shape=(num_layers,)).astype(np.int64)
    if (out < 0).any() or (np.diff(out) <= 0).any():
        raise ValueError(f"{source}: field 'layers' must be non-negative and increasing, got {out.tolist()}")
    n = MAX_MODEL_LAYERS if num_model_layers is None else check_positive_int(source, "num_model_layers", num_model_layers)
    if n > MAX_MODEL_LAYERS:
        raise ValueError(f"{source}: field 'num_model_layers' is {n}, more than the {MAX_MODEL_LAYERS} layers any model has")
    if out[-1] >= n:
        name = "num_model_layers" if num_model_layers is not None else "the limit of model layers"
        raise ValueError(f"{source}: layer id {int(out[-1])} is not below {name} {n}")
    return out

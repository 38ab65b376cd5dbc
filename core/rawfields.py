"""Raw values out of engine dump files: JSON, torch pickles (weights_only), safetensors.

Shared by the engine readers (`moeplace.sglang_dump`, `moeplace.trtllm`, `moeplace.profiler.sglang`);
separate from them because refusing unsafe or malformed file content is a concern of its own. Every
failure is a `ValueError` naming the file and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np


def _load_dict(path: Path) -> dict:
    data = _read_json(path) if path.suffix.lower() == ".json" else _torch_load(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict with key 'logical_count' or 'records', got {type(data).__name__}")
    return data


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None


def _torch_load(path: Path) -> object:
    import torch  # here, not at the top: the placer must start without torch

    try:
        # weights_only: tensors and plain containers only; any other pickled object is refused, never built.
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises pickle, zip and runtime errors for bad files
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise ValueError(f"{path}: refused: it pickles {refused.group(1)}, which is not a tensor or plain data") from None
        raise ValueError(f"{path}: not a readable torch file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def _tensor_values(src: str, field: str, value: object) -> object:
    """A dense torch tensor's values as numpy; other torch objects are returned unchanged (then refused)."""
    import torch

    if not isinstance(value, torch.Tensor):
        return value
    if value.layout != torch.strided or value.is_nested or value.is_quantized:
        kind = "nested" if value.is_nested else "quantized" if value.is_quantized else str(value.layout)
        raise ValueError(f"{src}: field '{field}' must be a plain dense tensor, got a {kind} tensor")
    # A pickled view may repeat a small storage many times (stride 0): a file of a few hundred bytes
    # could otherwise claim [10^5, 61, 256] and cost gigabytes. Its values must be stored in the file.
    stored = value.untyped_storage().nbytes() // max(value.element_size(), 1)
    if value.numel() > stored:
        raise ValueError(f"{src}: field '{field}' has shape {list(value.shape)} ({value.numel()} values) "
                         f"but the file stores only {stored}")
    tensor = value.detach().cpu()
    if tensor.is_complex():
        raise ValueError(f"{src}: field '{field}' must hold real numbers, got {tensor.dtype} values")
    return (tensor.double() if tensor.is_floating_point() else tensor).numpy()  # numpy has no bfloat16


def _numeric(src: str, field: str, value: object) -> np.ndarray:
    """A torch tensor or nested list as a numeric numpy array; ragged lists and non-numbers refused."""
    if type(value).__module__.startswith("torch"):
        value = _tensor_values(src, field, value)
    try:
        array = np.asarray(value)
    except ValueError:  # numpy refuses nested lists of unequal lengths
        raise ValueError(f"{src}: field '{field}' is ragged (nested lists of unequal lengths)") from None
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{src}: field '{field}' must hold numbers, got {array.dtype} values")
    return array

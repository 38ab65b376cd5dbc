"""Data shipped inside the package, found the same way from a checkout, an editable install or a wheel."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# The embedded OLMoE-1B-7B routing trace (Apache-2.0; see data/olmoe_routing.README.md): the default
# of `moeplace demo` and the popularity the embedded tiny model's routers follow.
EXAMPLE_TRACE = Path(str(files("moeplace").joinpath("data", "olmoe_routing.safetensors")))

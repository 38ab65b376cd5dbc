"""moeplace: expert placement and load balancing for Mixture-of-Experts inference.

The shared data model lives here: `Trace`, `Topology`, `Placement` and their files.
"""

from importlib.metadata import PackageNotFoundError, version

from moeplace.placement import Placement, load_placement, save_placement
from moeplace.topology import Topology
from moeplace.trace import Trace, save_trace

try:
    __version__ = version("moeplace")  # one source: pyproject.toml, read back from the installed metadata
except PackageNotFoundError:  # imported from a bare source tree, never installed
    __version__ = "0+unknown"
__all__ = ["Placement", "Topology", "Trace", "load_placement", "save_placement", "save_trace"]

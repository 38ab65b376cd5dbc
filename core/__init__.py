"""moeplace: expert placement and load balancing for Mixture-of-Experts inference.

The shared data model lives here: `Trace`, `Topology`, `Placement` and their files.
"""

from moeplace.placement import Placement, load_placement, save_placement
from moeplace.topology import Topology
from moeplace.trace import Trace, save_trace

__version__ = "0.1.0"
__all__ = ["Placement", "Topology", "Trace", "load_placement", "save_placement", "save_trace"]

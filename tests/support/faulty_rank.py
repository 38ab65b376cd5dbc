"""One rank of `moeplace serve` with reshard faults injected: the tests' launcher, run by torchrun in
place of `python -m moeplace.runtime.launch` (reshard_server.faulty_server), the server's options in
the environment as for that module.

    MOEPLACE_SERVE_CONFIG='{...}' torchrun ... tests/support/faulty_rank.py SPEC

SPEC as moeplace.runtime.reshard_faults.FaultPlan.parse takes it."""

from __future__ import annotations

import sys

from moeplace.runtime.launch import main
from moeplace.runtime.reshard_faults import FaultPlan

if __name__ == "__main__":
    main(faults=FaultPlan.parse(sys.argv[1]))

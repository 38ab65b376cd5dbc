"""moeplace.placer: solvers (greedy EPLB baselines, CP-SAT), evaluation and exporters. numpy + ortools only."""

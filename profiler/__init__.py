"""moeplace.profiler — see DESIGN.md."""

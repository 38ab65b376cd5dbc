"""moeplace.kernels — see DESIGN.md."""

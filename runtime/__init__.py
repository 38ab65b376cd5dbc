"""moeplace.runtime — see DESIGN.md."""

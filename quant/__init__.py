"""Placeholder package; see its issue."""

"""Healing: distilling the original into a file's own structure."""

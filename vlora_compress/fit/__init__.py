"""Fitting what a plan stores: alignment, low-rank factorisation, integers."""

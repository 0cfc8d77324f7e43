"""Scoring a file against the original, beside the alternatives, and checking budgets."""

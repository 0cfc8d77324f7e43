"""Calibration: the original model's layer-input Grams and the held-back output measure."""

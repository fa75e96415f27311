"""Quantization: single files, recipe sweeps and their reports."""

"""Judging a model from its predictions, NumPy and pandas: scores, curves and the gate."""

"""Judging a model from its predictions, with scikit-learn, NumPy and pandas: scores, curves and the gate."""

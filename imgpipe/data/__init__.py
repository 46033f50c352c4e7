"""Data logic on tables and sources, pandas, Great Expectations and SciPy: sources, ingestion, validation, splitting, rebalancing. Never TensorFlow."""

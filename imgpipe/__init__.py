"""imgpipe: an image-classification pipeline (DVC + Prefect) for data larger than memory."""

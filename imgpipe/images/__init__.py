"""Image files and pixels, NumPy and OpenCV only: formats, decoding, per-image facts, transforms. Never TensorFlow (ingest forks worker processes)."""

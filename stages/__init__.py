"""Pipeline stages: one module per dvc.yaml stage (`python -m stages.<name>`)."""

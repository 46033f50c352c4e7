"""Shared by every stage, no third-party dependency but PyYAML: typed params, errors, atomic writes, the stage runner."""

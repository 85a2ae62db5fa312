"""Bundled YAML presets and calibrated thresholds (data, loaded with importlib.resources)."""

"""Micro-benchmarks of the hot paths (pytest-benchmark); see test_hot_paths.py."""

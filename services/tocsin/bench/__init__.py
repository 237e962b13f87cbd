"""``tocsin bench``: load generator, ceiling broadcaster and scenarios (docs/benchmarks.md)."""

"""Tests of ``tocsin bench``: the load generator and the ceiling broadcaster."""

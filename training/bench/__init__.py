"""Measuring code the benchmark scripts share (scripts/bench_*.py import it, never each other)."""

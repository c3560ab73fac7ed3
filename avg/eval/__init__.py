"""Metrics, run files, baselines, benchmarks and reports."""

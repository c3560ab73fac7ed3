"""Experiments over trained runs: benchmarks, the experiment grid, reports over runs and seeds, results pages."""

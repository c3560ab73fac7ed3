"""The CLIP baseline stage, benchmarks, the experiment grid, reports over runs and seeds, results pages."""

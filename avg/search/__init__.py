"""Search a trained run from the command line: ``python -m avg.search --run outputs/demo "a query"``.

The CLI (avg.search.cli) is a thin layer over the Python API, avg.api.Retriever.
"""

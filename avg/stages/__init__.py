"""The pipeline's stages: one module per stage script, under the same name.

``scripts/<name>.sh`` runs ``python -m avg.stages.<name>``, which writes ``stage.json`` into its
output folder; :mod:`avg.artifacts.registry` lists the stages in pipeline order with their folders.
A stage module reads its inputs, calls the library (``avg.models``, ``avg.retriever``,
``avg.reranker``, ...) and writes its outputs; nothing in the package imports a stage module.
"""

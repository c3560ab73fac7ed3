"""Training objectives: the retriever's (``retrieval``: eqs. 7-10, with candidate mining, eq. 8) and the
reranker's listwise and pointwise losses (``rerank``)."""

"""AVG: text-to-image retrieval as autoregressive token-to-voken generation.

``from avg import Retriever`` loads a trained retriever to search with (avg.api); importing the
package itself stays light (torch and transformers load on first use).
"""

__version__ = "0.2.0"

__all__ = ["Retriever", "Hit", "__version__"]


def __getattr__(name: str):
    if name in ("Retriever", "Hit"):
        from avg import api

        return getattr(api, name)
    raise AttributeError(f"module 'avg' has no attribute {name!r}")

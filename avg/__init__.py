"""AVG: text-to-image retrieval as autoregressive token-to-voken generation."""

__version__ = "0.1.0"

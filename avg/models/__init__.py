"""nn.Module definitions and model configs shared across stages."""

"""Caption datasets: Karpathy-format json reader/validator, table converter, synthetic demo generator."""
from avg.data.convert import convert_captions, table_to_karpathy
from avg.data.demo import ensure_demo_dataset, generate_demo_dataset
from avg.data.karpathy import (
    SPLITS,
    CaptionDataset,
    DatasetError,
    ImageRecord,
    load_karpathy,
    tokenize_caption,
    validate_karpathy,
)

__all__ = [
    "SPLITS", "CaptionDataset", "DatasetError", "ImageRecord", "load_karpathy", "validate_karpathy",
    "tokenize_caption", "convert_captions", "table_to_karpathy", "generate_demo_dataset",
    "ensure_demo_dataset",
]

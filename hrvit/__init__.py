"""hrvit: Vision Transformers on gigapixel slides and 3-D volumes, trained with DeepSpeed."""

__version__ = "0.1.0"

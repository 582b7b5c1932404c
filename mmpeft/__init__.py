"""mmpeft: parameter-efficient fine-tuning recipes for multimodal language models."""

__version__ = "0.1.0"

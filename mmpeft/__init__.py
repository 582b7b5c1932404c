"""mmpeft: parameter-efficient fine-tuning recipes for multimodal language models."""

__version__ = "0.1.0"


def load(source, **kwargs):
    """Rebuild a run's trained model from its folder or Hub repo id; see `mmpeft.loading.load`."""
    from mmpeft.loading import load as _load

    return _load(source, **kwargs)

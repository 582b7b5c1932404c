"""mmpeft: parameter-efficient fine-tuning recipes for multimodal language models."""

import warnings

from mmpeft.models.quant import quiet_bitsandbytes_import

__version__ = "0.1.0"

# before any module of the package imports peft, which imports bitsandbytes
quiet_bitsandbytes_import()
# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model:
# nothing a user can change, so that one FutureWarning is not shown
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def load(source, **kwargs):
    """Rebuild a run's trained model from its folder or Hub repo id; see `mmpeft.loading.load`."""
    from mmpeft.loading import load as _load

    return _load(source, **kwargs)

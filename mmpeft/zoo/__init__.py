"""The tiny model zoo: CLIP, a causal LM and Stable Diffusion, trained on the tiny world."""

from .build import ZooSpec, build_zoo

__all__ = ["ZooSpec", "build_zoo"]

"""The tiny model zoo: CLIP, a causal LM and Stable Diffusion, trained on the tiny world."""

from mmpeft.tiny.zoo.build import ZooSpec, build_zoo

__all__ = ["ZooSpec", "build_zoo"]

"""The tiny world: procedurally generated scenes written in the formats real users have."""

from mmpeft.tiny.world.build import SPLITS, WorldSpec, build_world
from mmpeft.tiny.world.scene import COLOURS, SHAPES, SIZES, Thing, captions, qa_pairs, render, sample_scene

__all__ = ["COLOURS", "SHAPES", "SIZES", "SPLITS", "Thing", "WorldSpec", "build_world", "captions",
           "qa_pairs", "render", "sample_scene"]

"""A procedural world whose every fact is known: scenes, masks, captions, questions, counterfactual pairs,
a planted spurious cue, and a ground-truth judge of images.

    from mmlens.world import make_scene
    s = make_scene(seed=3)
    s.image, s.masks, s.caption, s.questions()
"""

from .judge import Detection, classify, detect
from .scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, Obj, Scene, make_scene, make_scenes, single_object_scene
from .pairs import counterfactual_pair
from .spurious import spurious_split

__all__ = ["BACKGROUNDS", "COLOURS", "SHAPES", "SIZES", "Detection", "Obj", "Scene", "classify", "counterfactual_pair",
           "detect", "make_scene", "make_scenes", "single_object_scene", "spurious_split"]

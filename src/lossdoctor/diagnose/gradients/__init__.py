"""Gradient norms per profile, level, head output and parameter, split by loss term.

Cost: every profile's loss is a weighted sum of the same per-sample losses, so the derivative of
each per-sample loss at the head outputs is computed once (autograd through the loss alone) and
each profile only rescales it. The 1x1 RPN convs and the box head are then differentiated by hand,
term by term, which is cheap (fc1's weight-gradient norm uses ``||G^T X||^2 = <G G^T, X X^T>``
with ``X X^T`` shared by every term and profile). The expensive parts, the 3x3 RPN conv and
RoIAlign, get one backward per profile and head, not one per term (the 3x3 conv's parameters are
therefore reported as a total, not split by term), and less where the gradient is sparse:

- the RPN conv's backward visits only the locations with a sampled anchor (``sparse_conv``);
  where most are sampled (``--sample-all``), the sampled negatives' dense backward is computed
  once and scaled by each profile, and the positives' stays sparse;
- a box-head stage with few positive RoIs among many is split the same way: the background
  RoIs' backward once, the positive RoIs' per profile, cross terms joining the norms;
- a mask term that is a multiple of the summed pixel BCE scales one shared backward.

Each shortcut is taken only where every value is finite (a NaN must spread as autograd spreads
it) and is tested equal to the plain backward.
"""

from .base import LevelGrads, ParamNorms, ProfileGrads
from .profile import gradients, profile_gradients

__all__ = ["LevelGrads", "ParamNorms", "ProfileGrads", "gradients", "profile_gradients"]

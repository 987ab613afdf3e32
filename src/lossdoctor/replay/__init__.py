"""Replay: pure tensor code from head weights and a batch to per-level losses. No I/O.

Shapes in every docstring of the replay and the diagnosis use these letters (``Tensor[R, 4]``):

- ``N``: images in the batch; ``i`` one of them.
- ``C``: channels of a feature map (256 in an FPN; a C4 model's res4: 1024); ``C'``: a head
  conv block's or res5's output channels.
- ``H_l, W_l`` (``H, W`` where one level is meant): the feature map of level ``l``.
- ``L``: the FPN levels of a batch; ``c``: the values an output gives per anchor (``K``, 4 or 1).
- ``A``: anchors per location; ``A_l = H_l * W_l * A``: anchors of level ``l`` per image.
- ``G`` (``G_i``): usable GT boxes (of image ``i``).
- ``M`` (``M_i``): candidates before sampling or NMS: anchors, proposals or detections; ``m``:
  one block of them.
- ``B``: the sampled anchors or RoIs of one term at one level.
- ``R``: the sampled RoIs of the batch (a stage's); ``P``: their positives (the mask head's).
- ``K``: foreground classes (``K+1`` with background); ``reg_classes``: ``K``, or 1 where the box
  regression is class-agnostic; ``Q``: the mask head's classes (``K`` or 1).
- ``S``: RoIAlign's output side (box head 7, mask head 14), ``g`` its samples per bin side;
  ``T``: the mask target side (28).
- ``F``: the box head's fc width (1024); ``F'``: what the box regressor takes (``F``, or a double
  head's conv branch width); ``D``: one RoI's features flattened.
- ``O``, ``I`` (``C_out``, ``C_in``), ``k``: a layer's output and input widths, a conv's kernel.
- ``V``: locations where a sparse gradient is non-zero; ``U``: the input rows it reaches.
"""

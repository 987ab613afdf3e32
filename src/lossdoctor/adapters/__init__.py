"""Framework adapters: from a torchvision, MMDetection or Detectron2 training run to a capture
directory (``DIR/checkpoint.pt`` + ``DIR/batch.pt``) that ``lossdoctor inspect DIR`` replays
faithfully, with no flag: the dump records the framework, the loss normalization the run trains
with and the live model's detector config.

Each module imports its framework only when used; no framework is a dependency of lossdoctor.
"""

"""A tiny two-stage detector and a synthetic shapes dataset, trained with lossdoctor's own
profile code.

Small enough to train on 2 CPU cores in minutes; its checkpoints use the native (torchvision)
key names, so they are ordinary lossdoctor inputs.
"""

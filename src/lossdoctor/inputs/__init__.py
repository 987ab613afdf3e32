"""Inputs: load and validate checkpoint, batch, detector config and loss profiles.

Every input error is raised here, as :class:`InputError`, with one line saying what is wrong
and how to fix it.
"""

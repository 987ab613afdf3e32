"""Diagnose: gradients, NaN/Inf origins, the detection symptom, and findings over the replay."""

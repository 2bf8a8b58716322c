"""Group-conditioned CLIP reward model (PerFusion-style): impressions, model, training, evaluation.

Imports the ``genshop`` core only; nothing in the core imports it.
"""

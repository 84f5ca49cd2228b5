"""Reproducible, tracked acute lymphoblastic leukemia classification (Otsu + morphology + CNN)."""

__version__ = "0.1.0"

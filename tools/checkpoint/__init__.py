"""Offline checkpoint conversion (convert.py) and its loaders, savers and workers."""

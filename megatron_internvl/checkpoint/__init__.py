"""Checkpoints.

Distributed save/load with a commit marker, and declarative HF weight mappings.
"""

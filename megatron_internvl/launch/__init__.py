"""Launching.

Slurm script rendering, submission and requeue logic.
"""

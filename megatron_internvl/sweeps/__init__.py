"""Scaling-law sweeps.

Sweep expansion, result collection, fitting and plotting.
"""

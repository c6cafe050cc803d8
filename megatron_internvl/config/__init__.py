"""Configuration schemas.

Dataclasses for model, parallel, data, training and cluster settings, validated once at the
boundary with errors that say what to change.
"""

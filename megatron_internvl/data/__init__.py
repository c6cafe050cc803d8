"""The input pipeline.

Shard format, DALI pipeline, tiling, chat template, packing, mixtures and loader state. Never
imports models: the packer knows token counts, not layers.
"""

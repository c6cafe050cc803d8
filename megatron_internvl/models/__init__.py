"""Model definitions.

The flavour registry, InternViT, the projector, language-model specs and InternVLModel. No
process-group globals and no training code live here; the backend (TE or local) is chosen by spec.
"""

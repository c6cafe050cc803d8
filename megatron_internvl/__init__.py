"""megatron-internvl: pretrain InternVL 2.5-class vision-language models on Megatron-Core."""

__version__ = "0.1.0"

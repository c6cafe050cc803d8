"""megatron-internvl: pretrain InternVL 2.5-class vision-language models on Megatron-Core."""

import importlib.util
import warnings

__version__ = "0.1.0"

# Without Transformer Engine (CPU hosts; TE lives in the `gpu` extra) Megatron-Core warns, once
# per module, that it falls back to torch's optimizers and norms: that fallback is this project's
# design (the local backend), so the warnings say nothing a user can act on.
if importlib.util.find_spec("transformer_engine") is None:
    warnings.filterwarnings(
        "ignore",
        message=r"(Transformer Engine and )?Apex (is|are) not installed",
        category=UserWarning,
    )

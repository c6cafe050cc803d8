"""Build the demo tokenizer: a small byte-level BPE with ChatML and InternVL special tokens.

Usage: python tools/build_demo_tokenizer.py [--data demo/data/demo.json] [--out demo/tokenizer]

Trained locally (no download) with HF `tokenizers` on the demo conversations plus the chat
template's fixed text, like Qwen2's tokenizer in kind (byte-level BPE, "\\n" never merged into
the next word, so the assistant prefix can be masked), but with a vocabulary of about 1000
tokens. Special tokens: <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos) and the InternVL
ones (chat.SPECIAL_TOKENS, <IMG_CONTEXT> included). Training is deterministic: the same data
give the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megatron_internvl.data.chat import DEFAULT_SYSTEM_PROMPT, SPECIAL_TOKENS

CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def corpus(data: Path) -> list[str]:
    """The texts to train on: every turn of the demo data and the template's own words."""
    texts = ["system\nuser\nassistant\n", DEFAULT_SYSTEM_PROMPT, "Image-1: Image-2: Image-3:"]
    for record in json.loads(data.read_text()):
        texts += [turn["value"].replace("<image>", "") for turn in record["conversations"]]
    return texts


def build(data: Path, out: Path, vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train the BPE on `data` and save it as a HF fast tokenizer in `out`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*CHATML, *SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(data), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=16384,
    )
    fast.save_pretrained(out)
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("demo/data/demo.json"))
    parser.add_argument("--out", type=Path, default=Path("demo/tokenizer"))
    parser.add_argument("--vocab-size", type=int, default=1000)
    args = parser.parse_args()
    fast = build(args.data, args.out, args.vocab_size)
    print(f"saved {len(fast)} tokens to {args.out}")


if __name__ == "__main__":
    main()

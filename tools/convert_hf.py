#!/usr/bin/env python
"""Convert InternVL checkpoints between Hugging Face safetensors and Megatron dist checkpoints.

The Megatron side loads at any TP/PP (dist_checkpointing reshards). Examples:

  # an HF InternVL checkpoint (original InternVLChatModel or transformers' layout) -> Megatron
  python tools/convert_hf.py to-megatron \\
      --hf-dir InternVL2_5-8B --out ckpt/internvl2_5_8b-megatron  # shape from its config.json

  # 26B-78B: pad the 25-head ViT to 32 heads so the checkpoint loads at TP 1, 2, 4 or 8
  python tools/convert_hf.py to-megatron --model internvl2_5_26b --vision-pad-heads-to 8 ...

  # stage 1: a bare InternViT + a bare LLM (9 InternVL tokens added, fresh projector)
  python tools/convert_hf.py to-megatron --model internvl2_5_1b \\
      --vision-dir InternViT-300M-448px-V2_5 --llm-dir Qwen2.5-0.5B-Instruct --out ckpt/stage1

  # a Megatron checkpoint -> HF (transformers' layout by default, or --layout original)
  python tools/convert_hf.py to-hf --ckpt ckpt/run/iter_0001000 --out hf/run-1000 \\
      --model internvl2_5_8b --dtype bfloat16

Outputs appear only when complete; an existing output directory is refused without --force.
Both directions stream one parameter at a time (memory stays near the largest shard, not the
model); progress goes to stderr: a bar on a terminal, a line per 10% otherwise.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    to_megatron = sub.add_parser(
        "to-megatron",
        help="HF safetensors -> Megatron dist checkpoint",
        description="Import a full InternVL HF checkpoint (--hf-dir), or build a stage-1 model "
        "from an InternViT (--vision-dir) and an LLM (--llm-dir).",
    )
    to_megatron.add_argument(
        "--model",
        help="flavour (tools/model_info.py --list); default for --hf-dir: the shape its "
        "config.json describes (any InternVL-architecture checkpoint)",
    )
    to_megatron.add_argument(
        "--hf-dir", help="InternVL checkpoint directory (config.json + shards)"
    )
    to_megatron.add_argument("--vision-dir", help="stage 1: InternViT checkpoint directory")
    to_megatron.add_argument(
        "--llm-dir", help="stage 1: Qwen2.5 / InternLM2.5 checkpoint directory"
    )
    to_megatron.add_argument("--out", required=True, help="output directory (must not exist)")
    to_megatron.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "original", "native"],
        help="layout of --hf-dir (default: from its config.json)",
    )
    to_megatron.add_argument(
        "--vision-pad-heads-to",
        type=int,
        help="pad ViT heads to a multiple of this: the largest TP you will load at (8 covers 1-8)",
    )
    to_megatron.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="saved parameter dtype (default: bfloat16 for a bf16 source, else float32)",
    )
    to_megatron.add_argument("--seed", type=int, default=1234, help="stage 1: projector init seed")
    to_megatron.add_argument("--force", action="store_true", help="replace an existing --out")

    to_hf = sub.add_parser(
        "to-hf",
        help="Megatron dist checkpoint -> HF safetensors",
        description="Export a dist checkpoint as HF safetensors shards + index + config.json.",
    )
    to_hf.add_argument(
        "--ckpt", required=True, help="dist checkpoint directory (has metadata.json)"
    )
    to_hf.add_argument("--out", required=True, help="output directory (must not exist)")
    to_hf.add_argument("--model", help="flavour (default: recorded at import, if it was imported)")
    to_hf.add_argument(
        "--layout",
        default="native",
        choices=["native", "original"],
        help="native: transformers' InternVLForConditionalGeneration; original: InternVLChatModel",
    )
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype")
    to_hf.add_argument("--shard-gb", type=float, default=4.0, help="max shard size in GiB")
    to_hf.add_argument("--tokenizer-dir", help="copy tokenizer files from here")
    to_hf.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore")  # Megatron's "TE/apex not installed" notes at import

    from megatron_internvl.checkpoint import convert
    from megatron_internvl.checkpoint.errors import ConversionError

    try:
        if args.command == "to-hf":
            out = convert.megatron_to_hf(
                args.ckpt,
                args.out,
                args.model,
                hf_layout=args.layout,
                dtype=args.dtype,
                max_shard_bytes=int(args.shard_gb * 2**30),
                tokenizer_dir=args.tokenizer_dir,
                force=args.force,
            )
        elif args.hf_dir and not (args.vision_dir or args.llm_dir):
            out = convert.hf_to_megatron(
                args.hf_dir,
                args.out,
                args.model,
                hf_layout=args.layout,
                vision_pad_heads_to=args.vision_pad_heads_to,
                dtype=args.dtype,
                force=args.force,
            )
        elif args.vision_dir and args.llm_dir and not args.hf_dir and args.model:
            out = convert.pieces_to_megatron(
                args.vision_dir,
                args.llm_dir,
                args.out,
                args.model,
                vision_pad_heads_to=args.vision_pad_heads_to,
                dtype=args.dtype,
                force=args.force,
                seed=args.seed,
            )
        else:
            print(
                "to-megatron: pass either --hf-dir, or --vision-dir, --llm-dir and --model",
                file=sys.stderr,
            )
            return 2
    except (ConversionError, KeyError) as error:
        print(f"error: {error.args[0] if error.args else error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # the guard matters: Megatron's checkpoint writer spawns processes
    sys.exit(main())

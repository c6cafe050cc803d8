#!/usr/bin/env python
"""Print an InternVL flavour's parameter counts (vision, projector, language, total).

The Megatron model is built on the meta device, so even 78B takes well under a second and no
memory. Counts use the unpadded vocabulary and TP=1 (no padded ViT heads).

    python tools/model_info.py --model internvl2_5_8b
    python tools/model_info.py --model internvl2_5_78b --json
    python tools/model_info.py --list
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="flavour name from the registry (see --list)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--list", action="store_true", help="list the flavours and exit")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # Megatron's "TE/apex not installed" notes at import

    from megatron_internvl.models.registry import REGISTRY, get_spec

    if args.list or not args.model:
        print("\n".join(REGISTRY))
        return 0 if args.list else 2
    try:
        spec = get_spec(args.model)
    except KeyError as error:
        print(error.args[0], file=sys.stderr)
        return 2

    from megatron_internvl.models.info import parameter_counts
    from megatron_internvl.parallel import runtime

    with runtime.single_process():
        counts = parameter_counts(spec)
    if args.json:
        print(json.dumps({"model": spec.name, **counts}))
    else:
        print(f"{spec.name} ({spec.llm_family} LLM)")
        for part, count in counts.items():
            print(f"  {part:<10} {count:>15,}  ({count / 1e9:.2f}B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

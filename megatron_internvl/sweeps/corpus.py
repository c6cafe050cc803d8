"""A generated corpus where model capacity matters: the data of the CPU scaling sweep.

`python -m megatron_internvl.sweeps.corpus --out runs/sweep_corpus` writes LLaVA-style records and
builds them into shards (tools/build_shards.py) under <out>/train and <out>/valid.

Each record shows a colour swatch and asks for its colour and some facts; the answer is the
colour's name (read off the image: the ViT's job) followed by `facts_per_record` facts
"subject object," where a subject is a pair of words and its object one word, fixed for the
corpus. Subjects are drawn with Zipf probabilities (p_k ~ k^-zipf), as words are in language:
frequent facts are learned first, the rare tail only by larger models trained on more tokens,
which is what makes loss fall as a power law in both parameters and tokens (each fact is ~8 bits
to store: a small LLM cannot hold them all) rather than in one step once a rule is learned.
The irreducible loss is the entropy of the subjects (unpredictable by design). All words are
single tokens of the demo tokenizer (demo/tokenizer), so the difficulty is the same as written.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

COLOURS = {
    "black": (0, 0, 0),
    "blue": (30, 60, 220),
    "brown": (120, 70, 20),
    "green": (30, 170, 60),
    "grey": (128, 128, 128),
    "red": (210, 30, 30),
    "white": (250, 250, 250),
    "yellow": (240, 220, 40),
}
QUESTION = "<image>\nWhat colour is this, and what do you know?"


def single_token_words(tokenizer_dir: Path) -> list[str]:
    """Lower-case alphabetic words the tokenizer encodes (with a leading space) as one token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    words = []
    for token_id in sorted(tokenizer.get_vocab().values()):
        text = tokenizer.decode([token_id])
        word = text[1:]
        if text.startswith(" ") and word.isalpha() and word.islower() and len(word) > 2:
            if tokenizer.encode(text, add_special_tokens=False) == [token_id]:
                words.append(word)
    return sorted(set(words) - set(COLOURS))


def facts_table(words: list[str], subjects: int, seed: int) -> list[tuple[str, str, str]]:
    """`subjects` distinct (word, word) subjects, each with a fixed object word."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in words for b in words if a != b]
    if subjects > len(pairs):
        raise ValueError(f"{subjects} subjects asked, {len(pairs)} word pairs available")
    return [(a, b, rng.choice(words)) for a, b in rng.sample(pairs, subjects)]


def records(
    facts: list[tuple[str, str, str]], count: int, facts_per_record: int, zipf: float, seed: int
) -> list[dict]:
    rng = random.Random(seed)
    weights = [(k + 1) ** -zipf for k in range(len(facts))]
    colours = sorted(COLOURS)
    out = []
    for i in range(count):
        colour = rng.choice(colours)
        chosen = rng.choices(facts, weights, k=facts_per_record)
        answer = f"{colour}. " + " ".join(f"{a} {b} {c}," for a, b, c in chosen)
        out.append(
            {
                "id": f"facts_{seed}_{i}",
                "image": f"images/{colour}.png",
                "conversations": [
                    {"from": "human", "value": QUESTION},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    return out


def write_corpus(
    out: Path,
    tokenizer_dir: Path,
    train_records: int = 8000,
    valid_records: int = 400,
    subjects: int = 4096,
    facts_per_record: int = 24,
    zipf: float = 1.1,
    seed: int = 0,
) -> dict[str, Path]:
    """Records + swatches under <out>/records, shards under <out>/train and <out>/valid."""
    from PIL import Image

    source = out / "records"
    (source / "images").mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (56, 56), rgb).save(source / "images" / f"{name}.png")
    facts = facts_table(single_token_words(tokenizer_dir), subjects, seed)
    (source / "facts.json").write_text(json.dumps(facts))
    splits = {"train": (train_records, seed + 1), "valid": (valid_records, seed + 2)}
    built = {}
    for split, (count, split_seed) in splits.items():
        path = source / f"{split}.json"
        path.write_text(json.dumps(records(facts, count, facts_per_record, zipf, split_seed)))
        build = Path(__file__).resolve().parents[2] / "tools" / "build_shards.py"
        command = [sys.executable, str(build), "--json", str(path), "--image-root", str(source)]
        command += ["--out", str(out / split), "--prefix", split, "--no-progress"]
        subprocess.run(command, check=True, capture_output=True)
        built[split] = out / split
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/sweep_corpus"))
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: demo/tokenizer")
    parser.add_argument("--train-records", type=int, default=8000)
    parser.add_argument("--valid-records", type=int, default=400)
    parser.add_argument("--subjects", type=int, default=4096)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from megatron_internvl.data.demo_data import DEMO_DIR

    built = write_corpus(
        args.out,
        args.tokenizer or DEMO_DIR / "tokenizer",
        args.train_records,
        args.valid_records,
        args.subjects,
        zipf=args.zipf,
        seed=args.seed,
    )
    print(" ".join(f"{split}: {path}" for split, path in built.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `internvl2_5` chat template: LLaVA-style conversations -> token ids and labels.

Each turn is rendered as ChatML, `<|im_start|>{role}\\n{text}<|im_end|>\\n`, and tokenized on its
own, as InternVL's `preprocess_internvl2_5` does. Labels are -100 except in assistant turns,
where the `<|im_start|>assistant\\n` prefix and the trailing `\\n` are masked, so the answer and
its `<|im_end|>` are supervised. Each `<image>` becomes `<img>` + `<IMG_CONTEXT>` x
(tokens_per_tile * tiles of that image) + `</img>`. `<IMG_CONTEXT>` is a special token, hence
atomic: the text is tokenized with one `<IMG_CONTEXT>` per image and the ids are expanded
afterwards, which gives the same ids without tokenizing thousands of copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
SPECIAL_TOKENS = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)
"""Tokens InternVL adds to the LLM tokenizer (ChatML <|im_start|>/<|im_end|> exist already)."""

DEFAULT_SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
    "多模态大语言模型。"
)
"""`system_message` of InternVL's `internvl2_5` conversation template."""

ASSISTANT_PREFIX = "<|im_start|>assistant\n"
_ROLES = {"human": "user", "gpt": "assistant"}

Conversation = Sequence[Mapping[str, Any]]
"""LLaVA style: [{"from": "system"|"human"|"gpt", "value": str}, ...]."""


def add_image_placeholders(
    conversation: Conversation, num_images: int, key: str = "?"
) -> list[dict[str, Any]]:
    """Copy of `conversation` with one `<image>` per image in its human turns.

    Follows InternVL's dataset code: with no `<image>` in any human turn, the first one gets
    `<image>\\n` (one image) or `Image-1: <image>\\nImage-2: <image>\\n...` (several). A partial
    count is ambiguous (which image goes where?) and is refused, as InternVL's assert does.
    """
    turns = [dict(turn) for turn in conversation]
    # Only human turns hold images (as in InternVL); elsewhere "<image>" stays plain text.
    found = sum(str(t["value"]).count(IMAGE_PLACEHOLDER) for t in turns if t.get("from") == "human")
    if found == 0 and num_images > 0:
        first_human = next((t for t in turns if t.get("from") == "human"), None)
        if first_human is None:
            raise ValueError(f"sample {key}: {num_images} image(s) but no human turn to hold them")
        if num_images == 1:
            prefix = f"{IMAGE_PLACEHOLDER}\n"
        else:
            prefix = "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images))
        first_human["value"] = prefix + first_human["value"]
    elif found != num_images:
        raise ValueError(
            f"sample {key}: the conversation has {found} {IMAGE_PLACEHOLDER} placeholder(s) but "
            f"{num_images} image(s); use one placeholder per image, or none to have them prepended"
        )
    return turns


def render_turns(
    conversation: Conversation,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    key: str = "?",
) -> list[tuple[str, str]]:
    """(role, ChatML text) per turn; a leading "system" turn replaces `system_prompt`.

    `<image>` placeholders are left as they are; `tokenize_conversation` replaces them.
    """
    turns = list(conversation)
    if turns and turns[0].get("from") == "system":
        system_prompt = str(turns[0]["value"])
        turns = turns[1:]
    rendered = []
    if system_prompt is not None:
        rendered.append(("system", f"<|im_start|>system\n{system_prompt}<|im_end|>\n"))
    for index, turn in enumerate(turns):
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(
                f"sample {key}: turn {index} has from={turn.get('from')!r}; expected 'human' or "
                "'gpt' (and 'system' only as the first turn)"
            )
        rendered.append((role, f"<|im_start|>{role}\n{turn['value']}<|im_end|>\n"))
    return rendered


def tokenize_conversation(
    conversation: Conversation,
    tiles_per_image: Sequence[int],
    tokenizer: Any,
    tokens_per_tile: int = 256,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    add_bos: bool = False,
    key: str = "?",
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where not supervised) of one sample.

    `tiles_per_image` holds the tile count of each image in order (thumbnail included);
    `tokenizer` is a HF tokenizer with the InternVL special tokens; `add_bos` prepends the BOS
    once (InternLM2 tokenizers); `key` names the sample in error messages.
    """
    turns = add_image_placeholders(conversation, len(tiles_per_image), key)
    rendered = render_turns(turns, system_prompt, key)
    image_text = f"{IMG_START}{IMG_CONTEXT}{IMG_END}"
    texts = [
        text.replace(IMAGE_PLACEHOLDER, image_text) if role == "user" else text
        for role, text in rendered
    ]
    ids_per_turn = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefix_ids = tokenizer(ASSISTANT_PREFIX, add_special_tokens=False)["input_ids"]
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    context_found = sum(ids.count(context_id) for ids in ids_per_turn)
    if context_found != len(tiles_per_image):
        raise ValueError(
            f"sample {key}: {context_found} image slot(s) in the tokenized text but "
            f"{len(tiles_per_image)} image(s); the text itself must not contain {IMG_CONTEXT}"
        )

    input_ids: list[int] = []
    labels: list[int] = []
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError(f"sample {key}: add_bos=True but the tokenizer has no BOS token")
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    image_index = 0
    for (role, _text), turn_ids in zip(rendered, ids_per_turn, strict=True):
        turn_labels = [IGNORE_INDEX] * len(turn_ids)
        if role == "assistant":
            if turn_ids[: len(prefix_ids)] != prefix_ids:
                raise ValueError(
                    f"sample {key}: the tokenizer merges {ASSISTANT_PREFIX!r} with the answer, "
                    "so the prompt prefix cannot be masked; use a tokenizer that splits at '\\n'"
                )
            # Supervise the answer and <|im_end|>; mask the prefix and the trailing "\n".
            turn_labels[len(prefix_ids) : -1] = turn_ids[len(prefix_ids) : -1]
        for token, label in zip(turn_ids, turn_labels, strict=True):
            if token == context_id:
                count = tokens_per_tile * tiles_per_image[image_index]
                input_ids.extend([context_id] * count)
                labels.extend([IGNORE_INDEX] * count)
                image_index += 1
            else:
                input_ids.append(token)
                labels.append(label)
    return input_ids, labels

"""The internvl2_5 template yields InternVL's token ids, image slots and label masks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megatron_internvl.data.chat import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    tokenize_conversation,
)

CHATML = ["<|im_start|>", "<|im_end|>"]
WORDS = [
    "<unk>", "<s>", "\n", "system", "user", "assistant", "be", "brief", "hello", "there", "hi",
    "name", "a", "color", "blue", ".", "what", "is", "this", "cat", "compare", "them", "same",
    "Image-1:", "Image-2:", "Image-3:",
]  # fmt: skip


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """Whole words, "\\n" on its own: token sequences can be written out by hand."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
        ]
    )
    tok.add_special_tokens([*CHATML, *SPECIAL_TOKENS])
    path = tmp_path_factory.mktemp("word_tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>"
    ).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A byte-level BPE like Qwen2's, trained on a few sentences: merges cross word pieces."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", *CHATML, *SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "system\nuser\nassistant\nYou are a helpful assistant.",
        "Describe the image in detail. The cat sits on the mat.",
        "What is shown here? A photograph of a rocket and an astronaut.",
        "Image-1: Image-2: compare the two images, which one is brighter?",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("bpe_tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>"
    ).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def as_pairs(tokenizer, input_ids, labels):
    """(token string, supervised?) per position; supervised labels must equal the token."""
    tokens = tokenizer.convert_ids_to_tokens(input_ids)
    for token_id, label in zip(input_ids, labels, strict=True):
        assert label in (IGNORE_INDEX, token_id)
    return [(t, label != IGNORE_INDEX) for t, label in zip(tokens, labels, strict=True)]


def turn(role, *words, supervised=False):
    """Hand-written ChatML turn: prefix and trailing \\n never supervised."""
    body = [(w, supervised) for w in words] + [("<|im_end|>", supervised)]
    return [("<|im_start|>", False), (role, False), ("\n", False), *body, ("\n", False)]


def test_two_turn_conversation_tokens_and_labels(word_tokenizer):
    conversation = [
        {"from": "human", "value": "hello there"},
        {"from": "gpt", "value": "hi"},
        {"from": "human", "value": "name a color"},
        {"from": "gpt", "value": "blue ."},
    ]
    ids, labels = tokenize_conversation(conversation, [], word_tokenizer, system_prompt="be brief")
    assert as_pairs(word_tokenizer, ids, labels) == [
        *turn("system", "be", "brief"),
        *turn("user", "hello", "there"),
        *turn("assistant", "hi", supervised=True),
        *turn("user", "name", "a", "color"),
        *turn("assistant", "blue", ".", supervised=True),
    ]


def test_image_conversation_expands_context_tokens_per_tile(word_tokenizer):
    conversation = [
        {"from": "human", "value": "<image>\nwhat is this"},
        {"from": "gpt", "value": "a cat"},
    ]
    ids, labels = tokenize_conversation(
        conversation, [3], word_tokenizer, tokens_per_tile=2, system_prompt=None
    )
    image = [("<img>", False), *[("<IMG_CONTEXT>", False)] * 6, ("</img>", False)]
    assert as_pairs(word_tokenizer, ids, labels) == [
        ("<|im_start|>", False),
        ("user", False),
        ("\n", False),
        *image,
        ("\n", False),
        ("what", False),
        ("is", False),
        ("this", False),
        ("<|im_end|>", False),
        ("\n", False),
        *turn("assistant", "a", "cat", supervised=True),
    ]
    # The default 256 tokens per tile: 7 tiles -> 1792 context tokens, nothing else changes.
    ids_256, labels_256 = tokenize_conversation(conversation, [7], word_tokenizer)
    context_id = word_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids_256.count(context_id) == 7 * 256
    assert sum(label != IGNORE_INDEX for label in labels_256) == 3  # "a", "cat", <|im_end|>


def test_multi_image_without_placeholders_gets_numbered_prefix(word_tokenizer):
    conversation = [
        {"from": "human", "value": "compare them"},
        {"from": "gpt", "value": "same"},
    ]
    ids, labels = tokenize_conversation(
        conversation, [2, 1], word_tokenizer, tokens_per_tile=1, system_prompt=None
    )

    def image(tiles):
        return [("<img>", False), *[("<IMG_CONTEXT>", False)] * tiles, ("</img>", False)]

    assert as_pairs(word_tokenizer, ids, labels) == [
        ("<|im_start|>", False),
        ("user", False),
        ("\n", False),
        ("Image-1:", False),
        *image(2),
        ("\n", False),
        ("Image-2:", False),
        *image(1),
        ("\n", False),
        ("compare", False),
        ("them", False),
        ("<|im_end|>", False),
        ("\n", False),
        *turn("assistant", "same", supervised=True),
    ]


def test_single_image_without_placeholder_gets_one_prepended(word_tokenizer):
    with_placeholder = [{"from": "human", "value": "<image>\nwhat"}, {"from": "gpt", "value": "a"}]
    without = [{"from": "human", "value": "what"}, {"from": "gpt", "value": "a"}]
    assert tokenize_conversation(without, [2], word_tokenizer) == tokenize_conversation(
        with_placeholder, [2], word_tokenizer
    )


def test_placeholder_count_mismatch_names_the_sample(word_tokenizer):
    conversation = [{"from": "human", "value": "<image> what"}, {"from": "gpt", "value": "a"}]
    with pytest.raises(ValueError, match=r"sample shard-3/000042: .* 1 <image> .* 2 image"):
        tokenize_conversation(conversation, [1, 1], word_tokenizer, key="shard-3/000042")
    with pytest.raises(ValueError, match=r"sample k7: .* 1 <image> .* 0 image"):
        tokenize_conversation(conversation, [], word_tokenizer, key="k7")


def test_context_token_in_raw_text_is_refused(word_tokenizer):
    conversation = [{"from": "human", "value": "<IMG_CONTEXT> hi"}, {"from": "gpt", "value": "a"}]
    with pytest.raises(ValueError, match="sample k1: 1 image slot"):
        tokenize_conversation(conversation, [], word_tokenizer, key="k1")


def test_unknown_role_is_refused(word_tokenizer):
    conversation = [{"from": "human", "value": "hi"}, {"from": "bot", "value": "a"}]
    with pytest.raises(ValueError, match="sample k2: turn 1 has from='bot'"):
        tokenize_conversation(conversation, [], word_tokenizer, key="k2")


def test_system_turn_replaces_the_prompt_and_bos_comes_once(word_tokenizer):
    conversation = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
    ]
    ids, labels = tokenize_conversation(
        conversation, [], word_tokenizer, system_prompt="ignored", add_bos=True
    )
    assert as_pairs(word_tokenizer, ids, labels) == [
        ("<s>", False),
        *turn("system", "be", "brief"),
        *turn("user", "hi"),
        *turn("assistant", "hello", supervised=True),
    ]


def reference_preprocess_internvl2_5(sources, tokenizer, num_image_token_list, system, add_bos):
    """InternVL's `preprocess_internvl2_5`, transcribed (packed mode, no truncation).

    Our tokenizer adds no BOS by itself, so InternVL's strip of the auto-added BOS is left out;
    with `add_bos` the BOS text is prepended to the first turn, as InternVL does.
    """
    conversations = copy.deepcopy(sources[0])
    if conversations[0]["from"] == "system":
        system_prompt = conversations[0]["value"]
        conversations = conversations[1:]
    else:
        system_prompt = system
    num_image = len(num_image_token_list)
    current_image_idx = 0
    for conversation in conversations:
        if conversation["from"] == "human":
            for _ in range(conversation["value"].count("<image>")):
                if current_image_idx == num_image:
                    break
                image_tokens = (
                    f"<img>{'<IMG_CONTEXT>' * num_image_token_list[current_image_idx]}</img>"
                )
                conversation["value"] = conversation["value"].replace("<image>", image_tokens, 1)
                current_image_idx += 1
    assert current_image_idx == num_image
    batches, roles = [], []
    if system_prompt is not None:
        batches.append(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")
        roles.append("system")
    for conversation in conversations:
        if conversation["from"] == "human":
            batches.append(f"<|im_start|>user\n{conversation['value']}<|im_end|>\n")
            roles.append("human")
        elif conversation["from"] == "gpt":
            batches.append(f"<|im_start|>assistant\n{conversation['value']}<|im_end|>\n")
            roles.append("gpt")
    if add_bos:
        batches[0] = tokenizer.bos_token + batches[0]
    input_ids = [np.array(x) for x in tokenizer(batches).input_ids]
    final_input_ids, final_targets = [], []
    ignore_len = len(tokenizer("<|im_start|>assistant\n").input_ids)
    for role, input_id in zip(roles, input_ids, strict=True):
        if role in ("system", "human"):
            final_targets.append(np.full(input_id.shape, IGNORE_INDEX))
        else:
            target = input_id.copy()
            target[:ignore_len] = IGNORE_INDEX
            target[-1:] = IGNORE_INDEX
            final_targets.append(target)
        final_input_ids.append(input_id)
    return np.concatenate(final_input_ids).tolist(), np.concatenate(final_targets).tolist()


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("system", [DEFAULT_SYSTEM_PROMPT, "You are a helpful assistant.", None])
def test_matches_internvl_preprocess_with_a_bpe_tokenizer(bpe_tokenizer, add_bos, system):
    conversations = [
        (
            [
                {"from": "human", "value": "<image>\nDescribe the image in detail."},
                {"from": "gpt", "value": "The cat sits on the mat.\nIt is brighter."},
                {"from": "human", "value": "What is shown here?"},
                {"from": "gpt", "value": "A photograph of a rocket."},
            ],
            [7],
        ),
        (
            [
                {"from": "system", "value": "Answer briefly."},
                {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\ncompare them"},
                {"from": "gpt", "value": "The two images: which one is brighter?"},
            ],
            [5, 1],
        ),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello <image> x"}], []),
    ]
    tokens_per_tile = 16
    for conversation, tiles in conversations:
        ours = tokenize_conversation(
            conversation,
            tiles,
            bpe_tokenizer,
            tokens_per_tile=tokens_per_tile,
            system_prompt=system,
            add_bos=add_bos,
        )
        reference = reference_preprocess_internvl2_5(
            [conversation], bpe_tokenizer, [tokens_per_tile * t for t in tiles], system, add_bos
        )
        assert ours == reference
        # Whatever the BPE merges, supervision ends on <|im_end|> and its "\n" is masked.
        ids, labels = ours
        supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert bpe_tokenizer.decode(ids[supervised[-1] : supervised[-1] + 2]) == "<|im_end|>\n"
        assert labels[supervised[-1] + 1] == IGNORE_INDEX == labels[-1]

"""InternVLModel's contracts on one rank: packing isolates samples, text-only rows keep the ViT
in the graph, image/token mismatches name the sample, padded ViT heads stay inert."""

from __future__ import annotations

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_internvl.models.internvl import build_internvl_chunks
from megatron_internvl.models.registry import get_spec
from megatron_internvl.parallel.layout import ParallelLayout

SPEC = get_spec("tiny_internlm_6b_style")


@pytest.fixture(scope="module")
def model(single_rank):
    torch.manual_seed(0)
    [chunk] = build_internvl_chunks(SPEC, ParallelLayout(), 64, vision_pad_heads_to=2)
    return chunk


def _sample(length: int, tiles: int, gen: torch.Generator):
    tokens = torch.randint(0, SPEC.image_token_id, (1, length), generator=gen)
    tokens[0, 1 : 1 + tiles * SPEC.tokens_per_tile] = SPEC.image_token_id
    size = SPEC.vision.image_size
    return tokens, torch.randn(tiles, 3, size, size, generator=gen)


def test_packed_row_equals_its_samples_run_alone(model):
    gen = torch.Generator().manual_seed(1)
    samples = [_sample(12, 1, gen), _sample(8, 0, gen), _sample(20, 2, gen)]
    labels = [torch.randint(0, 300, t.shape, generator=gen) for t, _ in samples]
    alone = []
    with torch.no_grad():
        for (tokens, images), lab in zip(samples, labels, strict=True):
            positions = torch.arange(tokens.size(1)).unsqueeze(0)
            alone.append(model(tokens, positions, images if images.size(0) else None, lab))
        cu = torch.tensor([0, 12, 20, 40], dtype=torch.int32)
        packed = model(
            torch.cat([t for t, _ in samples], dim=1),
            torch.cat([torch.arange(t.size(1)) for t, _ in samples]).unsqueeze(0),
            torch.cat([i for _, i in samples]),
            torch.cat(labels, dim=1),
            packed_seq_params=PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=cu,
                cu_seqlens_kv=cu,
                max_seqlen_q=20,
                max_seqlen_kv=20,
            ),
        )
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=1e-5, rtol=1e-5)


def test_text_only_rows_give_the_vision_side_zero_gradients(model):
    model.zero_grad()
    tokens = torch.randint(0, SPEC.image_token_id, (2, 16))
    loss = model(tokens, torch.arange(16).expand(2, 16), None, tokens).sum()
    loss.backward()
    for name, param in model.named_parameters():
        if name.startswith(("vision_model.", "vision_projection.")):
            assert param.grad is not None, f"{name} left out of the graph"
            assert torch.count_nonzero(param.grad) == 0, name


def test_image_token_mismatch_names_the_samples(model):
    tokens, images = _sample(16, 1, torch.Generator().manual_seed(2))
    with pytest.raises(
        ValueError, match=r"samples \['shard-00003/000042'\].*\[4\] <IMG_CONTEXT>.*but 2 tiles"
    ):
        model(
            tokens,
            torch.arange(16).unsqueeze(0),
            torch.cat([images, images]),
            tokens,
            sample_keys=["shard-00003/000042"],
        )
    with pytest.raises(ValueError, match="0 tiles"):
        model(tokens, torch.arange(16).unsqueeze(0), None, tokens)


def test_padded_vit_heads_get_zero_gradients(model):
    vit = model.vision_model
    assert vit.config.num_attention_heads == 6 and SPEC.vision.num_attention_heads == 5
    model.zero_grad()
    tokens, images = _sample(16, 1, torch.Generator().manual_seed(3))
    model(tokens, torch.arange(16).unsqueeze(0), images, tokens).sum().backward()
    head = vit.config.kv_channels
    for layer in vit.encoder.layers:
        attention = layer.self_attention
        dummy_rows = attention.linear_qkv.weight.grad[5 * 3 * head :]
        assert torch.count_nonzero(attention.linear_qkv.weight[5 * 3 * head :]) == 0
        assert torch.count_nonzero(dummy_rows) == 0
        assert torch.count_nonzero(attention.linear_proj.weight.grad[:, 5 * head :]) == 0
        assert torch.count_nonzero(attention.linear_qkv.weight.grad[: 5 * 3 * head]) > 0


def test_padded_vocabulary_leaves_loss_and_gradients_unchanged(single_rank):
    """vocab_multiple pads the embedding and output layers (300 -> 384 rows here); the padded
    logits are masked, so per-token losses and every real parameter's gradient equal the
    unpadded model's, and the padded rows get no gradient."""
    import dataclasses

    unpadded_spec = dataclasses.replace(
        SPEC, language=dataclasses.replace(SPEC.language, vocab_multiple=1)
    )
    assert SPEC.language.padded_vocab_size == 384 > unpadded_spec.language.padded_vocab_size
    torch.manual_seed(0)
    [padded] = build_internvl_chunks(SPEC, ParallelLayout(), 64, vision_pad_heads_to=2)
    [plain] = build_internvl_chunks(unpadded_spec, ParallelLayout(), 64, vision_pad_heads_to=2)
    vocab = SPEC.language.vocab_size
    with torch.no_grad():
        for name, param in plain.named_parameters():
            source = dict(padded.named_parameters())[name]
            param.copy_(source[:vocab] if source.shape != param.shape else source)
    gen = torch.Generator().manual_seed(3)
    tokens, images = _sample(40, 2, gen)
    labels = torch.randint(0, vocab, tokens.shape, generator=gen)
    positions = torch.arange(40).unsqueeze(0)
    losses = []
    for model in (padded, plain):
        model.zero_grad()
        loss = model(tokens, positions, images, labels)
        loss.sum().backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    grads = dict(plain.named_parameters())
    for name, param in padded.named_parameters():
        grad = param.grad
        if param.size(0) == SPEC.language.padded_vocab_size:
            assert not grad[vocab:].any(), f"{name}: padded rows got a gradient"
            grad = grad[:vocab]
        reference = grads[name].grad  # float32 noise: the softmax sums 384 columns, not 300
        scale = float(reference.abs().max())
        torch.testing.assert_close(
            grad, reference, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
    with torch.no_grad():
        logits = padded(tokens, positions, images)
    assert logits.size(-1) == 384 and logits[..., :vocab].argmax(-1).equal(logits.argmax(-1))

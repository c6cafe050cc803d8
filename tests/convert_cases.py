"""Test checkpoints for the converter: random transformers-native and hand-built original ones,
plus the rank function that computes our model's logits from a converted checkpoint."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_internvl.models.registry import InternVLSpec, get_spec

FLAVOURS = ("tiny_qwen_300m_style", "tiny_internlm_6b_style")
SEQ = 24


def load_dir(hf_dir: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory, by its name in the files."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(str(Path(hf_dir) / "*.safetensors"))):
        out.update(load_file(path))
    return out


def make_native(spec_name: str, out_dir: Path, seed: int = 0, shard: str = "40KB"):
    """A random transformers InternVLForConditionalGeneration, saved in several shards.

    Norm weights and layer scales are drawn around 1 so that swapping two norms, or a layer
    scale for another, would change the logits.
    """
    import transformers

    from tests.hf_oracle import hf_internvl_config

    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(
        hf_internvl_config(get_spec(spec_name))
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "lambda" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.05)
    model.save_pretrained(out_dir, max_shard_size=shard)
    return model


def write_random_native(spec: InternVLSpec, out_dir: Path, shard_bytes: int) -> list[int]:
    """Random float32 tensors of transformers' native shapes for `spec`, in shards of at most
    `shard_bytes` (a larger tensor gets its own), written one tensor at a time. Returns the
    shard file sizes."""
    import transformers

    from megatron_internvl.checkpoint import hf_files
    from megatron_internvl.checkpoint.hf_config import native_config
    from megatron_internvl.checkpoint.hf_mappings import native_file_name

    out_dir.mkdir(parents=True)
    config = native_config(spec, "float32")
    with torch.device("meta"):
        model = transformers.InternVLForConditionalGeneration(config)
    shapes = {native_file_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    sizes = [(name, 4 * torch.Size(shape).numel()) for name, shape in shapes.items()]
    gen = torch.Generator().manual_seed(0)
    weight_map, files = {}, []
    shards = hf_files.plan_shards(sizes, shard_bytes)
    for k, names in enumerate(shards):
        file = hf_files.shard_name(k + 1, len(shards))
        writer = hf_files.ShardWriter(
            out_dir / file, [(n, shapes[n]) for n in names], torch.float32
        )
        for name in names:
            writer.write(name, torch.randn(shapes[name], generator=gen))
        writer.close()
        weight_map.update(dict.fromkeys(names, file))
        files.append((out_dir / file).stat().st_size)
    hf_files.write_index(out_dir, weight_map, sum(size for _, size in sizes))
    (out_dir / "config.json").write_text(config.to_json_string())
    return files


def original_shapes(spec: InternVLSpec) -> dict[str, tuple[int, ...]]:
    """The original InternVLChatModel tensor names and shapes, written out from the reference
    (internvl25.md section 6), independently of the converter's tables."""
    v, lang = spec.vision, spec.language
    c, f, p = v.hidden_size, v.ffn_hidden_size, v.patch_size
    h, d = lang.hidden_size, lang.kv_channels or lang.hidden_size // lang.num_attention_heads
    q_rows, kv_rows = lang.num_attention_heads * d, lang.num_query_groups * d
    ffn, vocab = lang.ffn_hidden_size, lang.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.position_embedding": (1, 1 + v.num_patches, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, p, p),
        "vision_model.embeddings.patch_embedding.bias": (c,),
    }
    for i in range(v.num_layers):
        pre = f"vision_model.encoder.layers.{i}."
        shapes.update(
            {
                pre + "norm1.weight": (c,),
                pre + "attn.qkv.weight": (3 * c, c),
                pre + "attn.proj.weight": (c, c),
                pre + "attn.proj.bias": (c,),
                pre + "ls1": (c,),
                pre + "norm2.weight": (c,),
                pre + "mlp.fc1.weight": (f, c),
                pre + "mlp.fc1.bias": (f,),
                pre + "mlp.fc2.weight": (c, f),
                pre + "mlp.fc2.bias": (c,),
                pre + "ls2": (c,),
            }
        )
        if v.norm == "LayerNorm":
            shapes.update({pre + "norm1.bias": (c,), pre + "norm2.bias": (c,)})
        if v.qkv_bias:
            shapes[pre + "attn.qkv.bias"] = (3 * c,)
        if v.qk_norm:
            shapes.update({pre + "attn.q_norm.weight": (c,), pre + "attn.k_norm.weight": (c,)})
    shapes.update(
        {
            "mlp1.0.weight": (4 * c,),
            "mlp1.0.bias": (4 * c,),
            "mlp1.1.weight": (h, 4 * c),
            "mlp1.1.bias": (h,),
            "mlp1.3.weight": (h, h),
            "mlp1.3.bias": (h,),
            "language_model.model.norm.weight": (h,),
        }
    )
    for i in range(lang.num_layers):
        pre = f"language_model.model.layers.{i}."
        if spec.llm_family == "qwen2":
            shapes.update(
                {
                    pre + "self_attn.q_proj.weight": (q_rows, h),
                    pre + "self_attn.q_proj.bias": (q_rows,),
                    pre + "self_attn.k_proj.weight": (kv_rows, h),
                    pre + "self_attn.k_proj.bias": (kv_rows,),
                    pre + "self_attn.v_proj.weight": (kv_rows, h),
                    pre + "self_attn.v_proj.bias": (kv_rows,),
                    pre + "self_attn.o_proj.weight": (h, q_rows),
                    pre + "mlp.gate_proj.weight": (ffn, h),
                    pre + "mlp.up_proj.weight": (ffn, h),
                    pre + "mlp.down_proj.weight": (h, ffn),
                    pre + "input_layernorm.weight": (h,),
                    pre + "post_attention_layernorm.weight": (h,),
                }
            )
        else:
            shapes.update(
                {
                    pre + "attention.wqkv.weight": (q_rows + 2 * kv_rows, h),
                    pre + "attention.wo.weight": (h, q_rows),
                    pre + "feed_forward.w1.weight": (ffn, h),
                    pre + "feed_forward.w3.weight": (ffn, h),
                    pre + "feed_forward.w2.weight": (h, ffn),
                    pre + "attention_norm.weight": (h,),
                    pre + "ffn_norm.weight": (h,),
                }
            )
    if spec.llm_family == "qwen2":
        shapes["language_model.model.embed_tokens.weight"] = (vocab, h)
        shapes["language_model.lm_head.weight"] = (vocab, h)
    else:
        shapes["language_model.model.tok_embeddings.weight"] = (vocab, h)
        shapes["language_model.output.weight"] = (vocab, h)
    return shapes


def save_shards(tensors: dict[str, torch.Tensor], out_dir: Path, per_shard: int = 20) -> None:
    """Write `tensors` as several safetensors files with an index, as save_pretrained does."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    chunks = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for k, chunk in enumerate(chunks):
        file = f"model-{k + 1:05d}-of-{len(chunks):05d}.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def make_original(spec_name: str, out_dir: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random original-layout checkpoint built from `original_shapes`, with a minimal config."""
    spec = get_spec(spec_name)
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=gen) for n, s in original_shapes(spec).items()}
    save_shards(tensors, out_dir)
    llm_arch = "Qwen2ForCausalLM" if spec.llm_family == "qwen2" else "InternLM2ForCausalLM"
    config = {"architectures": ["InternVLChatModel"], "llm_config": {"architectures": [llm_arch]}}
    (out_dir / "config.json").write_text(json.dumps(config))
    return tensors


def model_inputs(spec_name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows with image-token runs (2 tiles, then 1 tile) and three random tiles."""
    spec = get_spec(spec_name)
    gen = torch.Generator().manual_seed(seed)
    tpt, size = spec.tokens_per_tile, spec.vision.image_size
    ids = torch.randint(0, spec.image_token_id, (2, SEQ), generator=gen)
    ids[0, 3 : 3 + 2 * tpt] = spec.image_token_id
    ids[1, 7 : 7 + tpt] = spec.image_token_id
    return {"input_ids": ids, "pixel_values": torch.randn(3, 3, size, size, generator=gen)}


def megatron_logits(ckpt: str, spec_name: str, inputs: dict[str, torch.Tensor]) -> dict:
    """Rank function: our logits from the dist checkpoint at TP=1, TP=2 and PP=2 (2 ranks).

    TP-sharded vocab logits are all-gathered; under PP the first stage sends its hidden
    states to the last, which returns the logits. The padded vocabulary's columns must hold the
    masked minimum; they are cut off to compare with transformers.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_internvl.models.internvl import build_internvl_chunks
    from megatron_internvl.parallel import cpu_platform
    from megatron_internvl.parallel.layout import ParallelLayout
    from tests import parity

    spec = get_spec(spec_name)
    ids = inputs["input_ids"]
    positions = torch.arange(ids.size(1)).expand_as(ids)
    results = {}
    for layout in (ParallelLayout(), ParallelLayout(tensor=2), ParallelLayout(pipeline=2)):
        parity.use_layout(layout)
        [model] = build_internvl_chunks(spec, layout, SEQ, vision_pad_heads_to=2)
        cpu_platform.adapt_model_config(model.config)
        parity.load_sharded([model], Path(ckpt))
        model.eval()
        with torch.no_grad():
            if layout.pipeline == 1:
                logits = model(ids, positions, images=inputs["pixel_values"])
                group = parallel_state.get_tensor_model_parallel_group()
                parts = [torch.empty_like(logits) for _ in range(layout.tensor)]
                dist.all_gather(parts, logits.contiguous(), group=group)
                results[str(layout)] = _unpadded(torch.cat(parts, dim=-1), spec)
            elif parallel_state.is_pipeline_first_stage():
                hidden_sbh = model(ids, positions, images=inputs["pixel_values"])
                dist.send(hidden_sbh.contiguous(), dst=1)
                results[str(layout)] = None
            else:
                hidden_sbh = torch.empty(ids.size(1), ids.size(0), spec.language.hidden_size)
                dist.recv(hidden_sbh, src=0)
                model.set_input_tensor(hidden_sbh)
                results[str(layout)] = _unpadded(model(ids, positions), spec)
    return results


def _unpadded(logits: torch.Tensor, spec) -> torch.Tensor:
    vocab = spec.language.vocab_size
    assert logits.size(-1) == spec.language.padded_vocab_size > vocab
    assert (logits[..., vocab:] == torch.finfo(logits.dtype).min).all()
    return logits[..., :vocab]

"""Models nobody on this team wrote, built from configs with random weights (nothing is
downloaded): Hugging Face GPT-2, BERT, Llama (grouped-query attention), ViT, ResNet, MobileNetV2,
and torch's nn.TransformerEncoder. Used by the benchmarks, the examples and the model-zoo tests;
``transformers`` is imported on first use."""

from __future__ import annotations

from torch import nn


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("these models need Hugging Face transformers: pip install transformers") from exc
    transformers.logging.set_verbosity_error()
    return transformers


def gpt2(*, layers: int = 2, width: int = 32, heads: int = 4, vocab: int = 48, positions: int = 16) -> nn.Module:
    t = _transformers()
    cfg = t.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=positions)
    return t.GPT2LMHeadModel(cfg)


def bert(*, layers: int = 2, width: int = 32, heads: int = 4, vocab: int = 48, positions: int = 16) -> nn.Module:
    t = _transformers()
    cfg = t.BertConfig(
        num_hidden_layers=layers,
        hidden_size=width,
        num_attention_heads=heads,
        intermediate_size=width * 3 // 2,
        vocab_size=vocab,
        max_position_embeddings=positions,
    )
    return t.BertForMaskedLM(cfg)


def llama(
    *, layers: int = 2, width: int = 32, heads: int = 4, kv_heads: int = 2, vocab: int = 48, positions: int = 16
) -> nn.Module:
    t = _transformers()
    cfg = t.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=width,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=width * 3 // 2,
        vocab_size=vocab,
        max_position_embeddings=positions,
    )
    return t.LlamaForCausalLM(cfg)


def vit(
    *, layers: int = 2, width: int = 32, heads: int = 4, image: int = 16, patch: int = 4, labels: int = 10, channels=3
) -> nn.Module:
    t = _transformers()
    cfg = t.ViTConfig(
        num_hidden_layers=layers,
        hidden_size=width,
        num_attention_heads=heads,
        intermediate_size=width * 3 // 2,
        image_size=image,
        patch_size=patch,
        num_labels=labels,
        num_channels=channels,
    )
    return t.ViTForImageClassification(cfg)


def resnet(*, widths: tuple[int, ...] = (8, 16), depths: tuple[int, ...] = (1, 1), labels: int = 10) -> nn.Module:
    t = _transformers()
    cfg = t.ResNetConfig(
        embedding_size=widths[0], hidden_sizes=list(widths), depths=list(depths), layer_type="basic", num_labels=labels
    )
    return t.ResNetForImageClassification(cfg)


def mobilenet_v2(*, image: int = 32, depth_multiplier: float = 0.35, labels: int = 10) -> nn.Module:
    t = _transformers()
    cfg = t.MobileNetV2Config(image_size=image, depth_multiplier=depth_multiplier, num_labels=labels)
    return t.MobileNetV2ForImageClassification(cfg)


def transformer_encoder(*, layers: int = 2, width: int = 32, heads: int = 4) -> nn.Module:
    layer = nn.TransformerEncoderLayer(width, heads, width * 3 // 2, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

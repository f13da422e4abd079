"""The model zoo: architectures nobody on this team wrote, built from small configs with random
weights (nothing is downloaded): Hugging Face GPT-2, BERT, a Llama-style decoder with grouped-query
attention, ViT, ResNet and MobileNetV2, and torch's own nn.TransformerEncoder.

Each case knows how to build the model, make a batch, compute a mean-reduced loss, what its
example inputs and output tensor are (for Torch-Pruning's tracing), and what the default
selection of prunable tensors leaves out, and why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*token_id.*", category=UserWarning)

VOCAB = 48


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    inputs: Callable[[Any], Any]  # the batch as the model's forward arguments (for tracing)
    output: Callable[[Any], torch.Tensor]  # the model's output as a tensor
    left_out: dict[str, str] = field(default_factory=dict)  # name pattern -> reason keyword
    classifier: str | None = None  # the module whose outputs are the predictions

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def batches(self, n: int, seed: int = 1) -> list:
        gen = torch.Generator().manual_seed(seed)
        return [self.batch(gen) for _ in range(n)]


def _tokens(gen: torch.Generator, batch: int = 4, length: int = 12) -> torch.Tensor:
    # ids from 1: id 0 is BERT's padding index, whose gradient torch zeroes by convention (that
    # gradient is then no gradient field, and exact and finite-difference Hḡ rightly differ)
    return torch.randint(1, VOCAB, (batch, length), generator=gen)


def _images(size: int, classes: int = 10):
    def make(gen):
        return torch.randn(4, 3, size, size, generator=gen), torch.randint(classes, (4,), generator=gen)

    return make


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _image_loss(model, batch):
    x, y = batch
    return model(pixel_values=x, labels=y).loss


def _encoder_loss(model, batch):
    x, y = batch
    return (model(x).mean(1)[:, : y.shape[1]] - y).square().mean()


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


def _bert():
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=VOCAB,
        max_position_embeddings=16,
    )
    return transformers.BertForMaskedLM(cfg)


def _llama():
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=VOCAB, max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(cfg)


def _vit():
    cfg = transformers.ViTConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48, image_size=16, patch_size=4,
        num_labels=10,
    )
    return transformers.ViTForImageClassification(cfg)


def _resnet():
    cfg = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10
    )
    return transformers.ResNetForImageClassification(cfg)


def _mobilenet():
    cfg = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=10)
    return transformers.MobileNetV2ForImageClassification(cfg)


def _encoder():
    layer = nn.TransformerEncoderLayer(32, 4, 48, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _sequences(gen):
    return torch.randn(4, 6, 32, generator=gen), torch.randn(4, 4, generator=gen)


CASES = {
    c.name: c
    for c in [
        Case(
            "gpt2", _gpt2, _tokens, _lm_loss, lambda ids: {"input_ids": ids}, lambda out: out.logits,
            {"wte.weight": "embedding table", "wpe.weight": "embedding table", "ln_": "normalization"},
        ),
        Case(
            "bert", _bert, _tokens, _lm_loss, lambda ids: {"input_ids": ids}, lambda out: out.logits,
            {"_embeddings.weight": "embedding table", "LayerNorm": "normalization"},
        ),
        Case(
            "llama", _llama, _tokens, _lm_loss, lambda ids: {"input_ids": ids}, lambda out: out.logits,
            {"embed_tokens": "embedding table", "norm": "normalization"},
            classifier="lm_head",
        ),
        Case(
            "vit", _vit, _images(16), _image_loss, lambda b: {"pixel_values": b[0]}, lambda out: out.logits,
            {"cls_token": "not a weight", "position_embeddings": "not a weight", "layernorm": "normalization"},
            classifier="classifier",
        ),
        Case(
            "resnet", _resnet, _images(32), _image_loss, lambda b: {"pixel_values": b[0]}, lambda out: out.logits,
            {"normalization": "normalization"},
            classifier="classifier.1",
        ),
        Case(
            "mobilenet_v2", _mobilenet, _images(32), _image_loss, lambda b: {"pixel_values": b[0]},
            lambda out: out.logits, {"normalization": "normalization"},
            classifier="classifier",
        ),
        Case(
            "transformer_encoder", _encoder, _sequences, _encoder_loss, lambda b: b[0], lambda out: out,
            {"norm": "normalization"},
        ),
    ]
}

ALL = list(CASES)


def linear_like(model: nn.Module) -> dict[str, str]:
    """Every weight and bias of a linear, convolutional or attention-projection layer, found
    independently of koopfast.prunable: canonical name -> layer type."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = {}
    for module in model.modules():
        kind = type(module).__name__
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or kind == "Conv1D":
            attrs = ["weight", "bias"]
        elif isinstance(module, nn.MultiheadAttention):
            attrs = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"]
        else:
            continue
        for attr in attrs:
            p = getattr(module, attr, None)
            if isinstance(p, nn.Parameter) and id(p) not in embeddings:
                out[canonical[id(p)]] = kind
    return out

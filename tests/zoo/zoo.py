"""The model zoo: architectures nobody on this team wrote, built from small configs with random
weights (nothing is downloaded): Hugging Face GPT-2, BERT, a Llama-style decoder with grouped-query
attention, ViT, ResNet and MobileNetV2, and torch's own nn.TransformerEncoder.

Each case knows how to build the model, make a batch, compute a mean-reduced loss, what its
example inputs are (for Torch-Pruning's tracing), and what the default selection of prunable
tensors leaves out, and why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from koopfast.benchmarks import models

pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*token_id.*", category=UserWarning)

VOCAB = 48


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    inputs: Callable[[Any], Any]  # the batch as the model's forward arguments (for tracing)
    left_out: dict[str, str] = field(default_factory=dict)  # name pattern -> reason keyword

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


def _sequences(gen):
    return torch.randn(4, 6, 32, generator=gen), torch.randn(4, 4, generator=gen)


def _ids(ids):
    return {"input_ids": ids}


def _pixels(batch):
    return {"pixel_values": batch[0]}


_EMBEDDING, _NORM, _OTHER = "embedding table", "normalization", "not a weight"

CASES = {
    c.name: c
    for c in [
        Case(
            "gpt2",
            lambda: models.gpt2(vocab=VOCAB),
            _tokens,
            _lm_loss,
            _ids,
            {"wte.weight": _EMBEDDING, "wpe.weight": _EMBEDDING, "ln_": _NORM},
        ),
        Case(
            "bert",
            lambda: models.bert(vocab=VOCAB),
            _tokens,
            _lm_loss,
            _ids,
            {"_embeddings.weight": _EMBEDDING, "LayerNorm": _NORM},
        ),
        Case(
            "llama",
            lambda: models.llama(vocab=VOCAB),
            _tokens,
            _lm_loss,
            _ids,
            {"embed_tokens": _EMBEDDING, "norm": _NORM},
        ),
        Case(
            "vit",
            models.vit,
            _images(16),
            _image_loss,
            _pixels,
            {"cls_token": _OTHER, "position_embeddings": _OTHER, "layernorm": _NORM},
        ),
        Case("resnet", models.resnet, _images(32), _image_loss, _pixels, {"normalization": _NORM}),
        Case("mobilenet_v2", models.mobilenet_v2, _images(32), _image_loss, _pixels, {"normalization": _NORM}),
        Case(
            "transformer_encoder",
            models.transformer_encoder,
            _sequences,
            _encoder_loss,
            lambda b: b[0],
            {"norm": _NORM},
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

"""Gradient-flow criteria: the whole |θ ⊙ Hg| pipeline, and operands straight into the selection.

* ``pipeline``: gradient-norm-preservation masks (90 % sparsity) for an MLP from 20 batches of 128,
  the authors' way (double backpropagation per batch accumulating Hg in .grad, scores
  materialised, concatenated, torch.kthvalue) against koopfast (exact double backward or finite
  differences, masks straight from (θ, Hg)).
* ``selection``: |θ ⊙ g| masks over 200 tensors: koopfast with the operands handed to the kernel,
  koopfast on materialised scores, and torch (materialise, torch.cat, torch.kthvalue, compare).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import koopfast as kf
from koopfast.benchmarks.harness import Row, fill_ratios, measure
from koopfast.benchmarks.select import model_like

AUTHORS = "authors' way: double backward, materialise, cat + kthvalue"
TORCH_SELECT = "torch: materialise |θg|, cat + kthvalue"


@dataclass(frozen=True)
class PipelineCase:
    width: int
    batches: int = 20
    batch_size: int = 128

    @property
    def name(self) -> str:
        return f"|θ⊙Hg| masks, MLP 784-{self.width}-{self.width}-10, {self.batches}x{self.batch_size}"


def _model_and_data(case: PipelineCase):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, case.width), nn.Tanh(), nn.Linear(case.width, case.width), nn.Tanh(), nn.Linear(case.width, 10)
    )
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(case.batch_size, 784, generator=gen), torch.randint(10, (case.batch_size,), generator=gen))
        for _ in range(case.batches)
    ]
    return model, batches


def authors_way(model: nn.Module, batches, sparsity: float) -> list[torch.Tensor]:
    """A transcription of the flowandprune approach for |θ ⊙ Hg|, unstructured."""
    params = list(model.parameters())
    model.zero_grad()
    for x, y in batches:
        (nn.functional.cross_entropy(model(x), y) / len(batches)).backward()
    g = [p.grad.detach().clone() for p in params]
    model.zero_grad()
    for x, y in batches:
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
        (sum((gr * v).sum() for gr, v in zip(grads, g)) / len(batches)).backward()
    scores = [(p.detach() * p.grad).abs() for p in params]
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = round((1 - sparsity) * flat.numel())
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    model.zero_grad()
    return [s >= threshold for s in scores]


def run_pipeline(case: PipelineCase, repeat: int | None) -> list[Row]:
    model, batches = _model_and_data(case)
    model.eval()
    loss = kf.criteria.cross_entropy()
    methods = {
        AUTHORS: lambda: authors_way(model, batches, 0.9),
        "koopfast exact Hg + fused masks": lambda: list(
            kf.criteria.gradient_flow(model, loss, batches, hvp="exact")
            .masks("gradient_norm_preservation", 0.9)
            .values()
        ),
        "koopfast finite-difference Hg + fused masks": lambda: list(
            kf.criteria.gradient_flow(model, loss, batches, hvp="finite_difference")
            .masks("gradient_norm_preservation", 0.9)
            .values()
        ),
    }
    reference = methods[AUTHORS]()
    n = sum(m.numel() for m in reference)
    rows = []
    for name, fn in methods.items():
        masks = fn()
        overlap = sum(int((a & b).sum()) for a, b in zip(masks, reference)) / sum(int(m.sum()) for m in reference)
        if name.startswith("koopfast exact"):
            assert overlap > 0.999, overlap  # float32 sums in another order: near-ties may flip
        note = f"mask overlap with the authors' way: {overlap:.4f}"
        rows.append(
            measure(
                fn,
                family="gradflow",
                case=case.name,
                method=name,
                n=n,
                device=torch.device("cpu"),
                repeat=repeat or 3,
                note=note,
            )
        )
    return fill_ratios(rows, AUTHORS)


def run_selection(n: int, device: torch.device, repeat: int | None) -> list[Row]:
    theta = model_like(n, 200, torch.float32, device, seed=0)
    gen = torch.Generator().manual_seed(1)
    grad = [(torch.randn(t.shape, generator=gen) * 1e-3).to(device) for t in theta]
    case = f"|θg| masks N={n:.0e} in 200 tensors"
    k = kf.masks.keep_count(n, 0.9)

    def torch_way():
        scores = [(a * b).abs() for a, b in zip(theta, grad)]
        flat = torch.cat([s.reshape(-1) for s in scores])
        threshold = torch.kthvalue(flat, n - k + 1).values
        return [s >= threshold for s in scores]

    methods = {
        "koopfast: operands into the kernel": lambda: kf.masks.global_topk(
            list(zip(theta, grad)), 0.9, by="abs_product"
        ),
        "koopfast: materialise, then select": lambda: kf.masks.global_topk(
            [(a * b).abs() for a, b in zip(theta, grad)], 0.9
        ),
        TORCH_SELECT: torch_way,
    }
    expected = methods[TORCH_SELECT]()
    for name, fn in methods.items():
        got = fn()
        assert sum(int((a & b).sum()) for a, b in zip(got, expected)) >= k - 8, name  # ties at the threshold
    rows = [
        measure(
            fn, family="gradflow", case=case, method=name, n=n, device=device, bytes_moved=2 * n * 4, repeat=repeat or 5
        )
        for name, fn in methods.items()
    ]
    return fill_ratios(rows, TORCH_SELECT)


def run(device: torch.device, *, quick: bool = False, repeat: int | None = None) -> list[Row]:
    pipeline = PipelineCase(width=256) if quick else PipelineCase(width=1024)
    return run_pipeline(pipeline, repeat) + run_selection(10**6 if quick else 10**7, device, repeat)

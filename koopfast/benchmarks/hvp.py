"""Hḡ on transformers: exact (double backward) against finite differences, time, memory and error.

Models built from configs with random weights (GPT-2, BERT, a Llama-style decoder with grouped-query
attention, ViT, nn.TransformerEncoder), their default SDPA attention, the default prunable tensors,
a few batches. Methods: koopfast's exact Hḡ (double backpropagation under the math attention
backend), koopfast's finite differences with the self-check (``fd_step="auto"``: 12 extra backward
passes of the first batch) and with the step the self-check chose given directly, and the
PyTorch way a user would write for H v (``torch.func.jvp`` of ``torch.func.grad``, forward over
reverse, one batch at a time). Error: relative to a float64 double-backward reference of the same
model and batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import koopfast as kf
from koopfast.benchmarks import models
from koopfast.benchmarks.harness import Row, fill_ratios, measure
from koopfast.criteria.gradflow import FD_TOLERANCE

EXACT = "koopfast hvp='exact' (double backward)"
FD_AUTO = "koopfast hvp='finite_difference' (self-check)"
FD_GIVEN = "koopfast finite difference, step given"
TORCH_FUNC = "torch.func jvp(grad) per batch"


@dataclass(frozen=True)
class HvpCase:
    model: str
    width: int
    layers: int
    batches: int = 4
    batch_size: int = 8
    length: int = 32

    @property
    def name(self) -> str:
        return f"Hg {self.model} {self.layers}x{self.width}, {self.batches} batches of {self.batch_size}"


def build(case: HvpCase):
    """(model, batches, loss_fn) for a case."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    vocab = 4 * case.width
    if case.model in ("gpt2", "bert", "llama"):
        build = {"gpt2": models.gpt2, "bert": models.bert, "llama": models.llama}[case.model]
        model = build(layers=case.layers, width=case.width, vocab=vocab, positions=case.length)
        batches = [torch.randint(1, vocab, (case.batch_size, case.length), generator=gen) for _ in range(case.batches)]

        def loss(m, ids):
            return m(input_ids=ids, labels=ids).loss

    elif case.model == "vit":
        model = models.vit(layers=case.layers, width=case.width, image=32, patch=4)
        images = [torch.randn(case.batch_size, 3, 32, 32, generator=gen) for _ in range(case.batches)]
        batches = [(x, torch.randint(10, (case.batch_size,), generator=gen)) for x in images]

        def loss(m, batch):
            return m(pixel_values=batch[0], labels=batch[1]).loss

    else:
        model = models.transformer_encoder(layers=case.layers, width=case.width)
        batches = [
            (torch.randn(case.batch_size, case.length, case.width, generator=gen), torch.randn(case.batch_size, 4))
            for _ in range(case.batches)
        ]

        def loss(m, batch):
            return (m(batch[0]).mean(1)[:, :4] - batch[1]).square().mean()

    return model.eval(), batches, loss


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in d.values()])


def torch_func_hg(model, batches, loss_fn, params: dict[str, torch.Tensor]):
    """H ḡ the torch.func way: ḡ by backward over all batches, then jvp(grad) batch by batch."""
    mean_loss = sum(loss_fn(model, b) for b in batches) / len(batches)
    g = dict(zip(params, torch.autograd.grad(mean_loss, list(params.values()))))
    fixed = {n: p.detach() for n, p in params.items()}

    def batch_loss(theta, batch):
        return loss_fn(_Call(model, theta), batch)

    total = {n: torch.zeros_like(t) for n, t in fixed.items()}
    with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no forward-mode derivative either
        for batch in batches:
            _, hv = jvp(lambda theta, b=batch: grad(batch_loss)(theta, b), (fixed,), (g,))
            for n in total:
                total[n] += hv[n]
    return {n: t / len(batches) for n, t in total.items()}


class _Call:
    """model(*args, **kwargs) with the parameters in ``theta`` (for torch.func)."""

    def __init__(self, model, theta):
        self.model, self.theta = model, theta

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.theta, args=args, kwargs=kwargs)


def run_case(case: HvpCase, repeat: int | None) -> list[Row]:
    model, batches, loss = build(case)
    params = {n: e.tensor for n, e in kf.prunable.prunable(model).items()}
    n = sum(p.numel() for p in params.values())
    reference_model, _, _ = build(case)
    reference_model.double()
    ref_batches = [
        b if isinstance(b, torch.Tensor) else tuple(x.double() if x.is_floating_point() else x for x in b)
        for b in batches
    ]
    reference = flat(kf.criteria.gradient_flow(reference_model, loss, ref_batches, hvp="exact").hg)
    # the self-check's choice; with the default fd_tol a refused case raises, so time it without one
    auto = kf.criteria.gradient_flow(model, loss, batches, hvp="finite_difference", fd_tol=math.inf)
    refused = auto.fd_error > FD_TOLERANCE
    methods: dict[str, Callable] = {
        EXACT: lambda: kf.criteria.gradient_flow(model, loss, batches, hvp="exact").hg,
        FD_AUTO: lambda: (
            kf.criteria.gradient_flow(
                model, loss, batches, hvp="finite_difference", fd_tol=math.inf if refused else FD_TOLERANCE
            ).hg
        ),
        FD_GIVEN: lambda: (
            kf.criteria.gradient_flow(model, loss, batches, hvp="finite_difference", fd_step=auto.fd_step).hg
        ),
        TORCH_FUNC: lambda: torch_func_hg(model, batches, loss, params),
    }
    rows = []
    for name, fn in methods.items():
        error = float((flat(fn()) - reference).norm() / reference.norm())
        note = f"relative error {error:.1e} vs float64 exact"
        if name == FD_AUTO:
            note += f"; self-check estimate {auto.fd_error:.1e}, step {auto.fd_step:.2g}"
            if refused:
                note += f" (above fd_tol={FD_TOLERANCE:g}: gradient_flow raises by default)"
        rows.append(
            measure(
                fn,
                family="hvp",
                case=case.name,
                method=name,
                n=n,
                device=torch.device("cpu"),
                repeat=repeat or 3,
                note=note,
                extra={"relative_error": error},
            )
        )
    return fill_ratios(rows, EXACT)


def cases(quick: bool) -> list[HvpCase]:
    if quick:
        return [HvpCase("gpt2", 32, 2, batches=2, batch_size=4, length=16)]
    return [
        HvpCase("gpt2", 128, 4),
        HvpCase("bert", 128, 4),
        HvpCase("llama", 128, 4),
        HvpCase("vit", 128, 4),
        HvpCase("transformer_encoder", 128, 4),
    ]


def run(device: torch.device, *, quick: bool = False, repeat: int | None = None) -> list[Row]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("hvp: skipped (transformers is not installed: pip install transformers)")
        return []
    if device.type != "cpu":
        print("hvp: runs on the CPU only (its cases are small models)")
    return [row for case in cases(quick) for row in run_case(case, repeat)]


def summary(rows: list[Row]) -> str:
    lines = [f"  {r.case}: {r.method}: {r.note}" for r in rows]
    return "relative errors of Hg:\n" + "\n".join(lines)

"""Wanda scoring and N:M / per-row / global selection on a GPT-2-small-sized model, against plain PyTorch.

The model: Hugging Face GPT-2 from ``GPT2Config`` (12 blocks, width 768: 85 M weights in its 48
Conv1D layers; random weights, nothing downloaded); ``--quick`` uses 2 blocks of width 64.

- Wanda scores over the calibration batches: ``kf.criteria.wanda`` against what the authors'
  code does in plain PyTorch (wanda/lib/layerwrapper.py: forward hooks keeping a float32 running
  mean of ‖X_j‖² per input channel, then |W|·sqrt of it), written here from that description.
  Both are dominated by the forward passes; the scores agree up to the constant sqrt(samples).
- 50 % per output row (Wanda's comparison groups): ``WandaScores.masks`` against a row-wise
  ``torch.sort`` and ``scatter_`` (the authors' selection).
- 2:4 along the inputs: ``kf.masks.nm_masks`` against vectorized PyTorch (groups of 4 by
  ``reshape`` + ``topk`` + ``scatter_``) and the authors' loop over column groups (one ``topk``
  per group of 4 columns: wanda/lib/prune.py).
- 50 % over all layers (a global budget): ``kf.masks.global_topk`` against ``torch.cat`` +
  ``topk`` + ``scatter_``.

Every method's masks are checked against koopfast's before anything is timed: the same kept
scores in every comparison group (torch.topk orders ties arbitrarily, and among 85 M float32
scores some groups of 4 hold equal ones).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import koopfast as kf
from koopfast.benchmarks.harness import Row, fill_ratios, measure

FAMILY = "llm"
KOOPFAST_WANDA = "koopfast wanda"
PLAIN_WANDA = "plain PyTorch (authors' running mean)"
KOOPFAST_ROWS = "koopfast WandaScores.masks"
PLAIN_ROWS = "torch.sort per row + scatter_"
KOOPFAST_NM = "koopfast nm_masks"
PLAIN_NM = "torch reshape + topk + scatter_"
LOOP_NM = "authors' loop (topk per 4 columns)"
KOOPFAST_GLOBAL = "koopfast global_topk"
PLAIN_GLOBAL = "torch.cat + topk + scatter_"


@dataclass(frozen=True)
class LlmCase:
    layers: int
    width: int
    heads: int
    batches: int
    batch_size: int
    length: int
    vocab: int = 50257

    @property
    def name(self) -> str:
        return f"GPT-2 {self.layers}x{self.width}, {self.batches}x{self.batch_size}x{self.length} tokens"


def cases(quick: bool) -> list[LlmCase]:
    if quick:
        return [LlmCase(2, 64, 4, batches=2, batch_size=2, length=32, vocab=512)]
    return [LlmCase(12, 768, 12, batches=4, batch_size=2, length=128)]


def build(case: LlmCase) -> tuple[nn.Module, list[Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=case.layers,
        n_embd=case.width,
        n_head=case.heads,
        vocab_size=case.vocab,
        n_positions=case.length,
        bos_token_id=case.vocab - 1,
        eos_token_id=case.vocab - 1,
    )
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, case.vocab, (case.batch_size, case.length), generator=gen) for _ in range(case.batches)]
    return model, batches


def conv1d_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}


def plain_wanda(model: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
    """What the authors' WrappedGPT does, as a PyTorch user writes it: per layer a float32 running
    mean over samples of ‖X_j‖² (X: the layer's input rows of one sample), then |W|·sqrt(mean)."""
    layers = conv1d_layers(model)
    means = {n: torch.zeros(m.weight.shape[0]) for n, m in layers.items()}
    seen = dict.fromkeys(layers, 0)

    def hook_for(name):
        def hook(_module, args):
            x = args[0].detach()
            samples = x.shape[0]
            rows = x.reshape(-1, x.shape[-1]).float()
            means[name] *= seen[name] / (seen[name] + samples)
            seen[name] += samples
            means[name] += torch.norm(rows, p=2, dim=0) ** 2 / seen[name]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for ids in batches:
                model(ids)
    finally:
        for h in handles:
            h.remove()
    # Conv1D weights are [in, out]: the input channel is dim 0
    return {f"{n}.weight": m.weight.detach().abs() * means[n].sqrt()[:, None] for n, m in layers.items()}


def rows_sort(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Per output unit (a Conv1D column) keep the top round((1 - s) · in) scores."""
    out = {}
    for name, s in scores.items():
        rows = s.t()
        keep = round((1 - sparsity) * rows.shape[1])
        order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :keep]
        out[name] = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, order, True).t()
    return out


def nm_vectorized(scores: dict[str, Tensor], n: int, m: int) -> dict[str, Tensor]:
    out = {}
    for name, s in scores.items():
        rows = s.t().reshape(s.shape[1], -1, m)  # [outputs, groups, m]
        keep = torch.zeros_like(rows, dtype=torch.bool).scatter_(2, rows.topk(n, dim=2).indices, True)
        out[name] = keep.reshape(s.shape[1], s.shape[0]).t()
    return out


def nm_loop(scores: dict[str, Tensor], n: int, m: int) -> dict[str, Tensor]:
    out = {}
    for name, s in scores.items():
        rows = s.t()
        pruned = torch.zeros_like(rows, dtype=torch.bool)
        for i in range(0, rows.shape[1], m):
            pruned.scatter_(1, i + torch.topk(rows[:, i : i + m], m - n, dim=1, largest=False).indices, True)
        out[name] = (~pruned).t()
    return out


def global_topk_plain(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = round((1 - sparsity) * flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, flat.topk(keep).indices, True)
    return {
        name: m.view_as(s) for (name, s), m in zip(scores.items(), mask.split([s.numel() for s in scores.values()]))
    }


def _kept(scores: dict[str, Tensor], masks: dict[str, Tensor], group: int | None) -> list[Tensor]:
    """The kept scores, sorted, per group of ``group`` consecutive inputs of each output unit
    (Conv1D: a column), per output unit (``group`` 0), or over all tensors (None)."""
    if group is None:
        return [torch.cat([s[masks[n]] for n, s in scores.items()]).sort().values]
    out = []
    for name, s in scores.items():
        rows = s.t().masked_fill(~masks[name].t(), float("-inf"))
        out.append((rows.reshape(rows.shape[0], -1, group) if group else rows).sort(-1).values)
    return out


def _check(name: str, got: dict[str, Tensor], want: dict[str, Tensor], scores, group: int | None) -> None:
    """Equal kept scores in every comparison group: the same masks up to the order among ties
    (torch.topk breaks ties arbitrarily; with 85 M float32 scores some groups hold equal ones)."""
    for a, b in zip(_kept(scores, got, group), _kept(scores, want, group)):
        if not torch.equal(a, b):
            raise AssertionError(f"llm bench: {name} keeps other scores than koopfast")


METHODS = {
    "Wanda scores": [KOOPFAST_WANDA, PLAIN_WANDA],
    "50 % per output row": [KOOPFAST_ROWS, PLAIN_ROWS],
    "2:4 along inputs": [KOOPFAST_NM, PLAIN_NM, LOOP_NM],
    "50 % global": [KOOPFAST_GLOBAL, PLAIN_GLOBAL],
}


def methods(model: nn.Module, batches: list[Tensor]) -> dict[str, dict[str, Callable[[], object]]]:
    """group -> method -> a call, every method's result checked against koopfast's first."""
    scores = kf.criteria.wanda(model, batches)
    plain = plain_wanda(model, batches)
    samples = sum(b.shape[0] for b in batches)
    for key, s in scores.items():  # the same scores up to the authors' 1/sqrt(samples)
        torch.testing.assert_close(plain[key] * samples**0.5, s, rtol=1e-4, atol=1e-6)
    tensors = dict(scores)
    calls: dict[str, dict[str, Callable[[], object]]] = {
        "Wanda scores": {
            KOOPFAST_WANDA: lambda: kf.criteria.wanda(model, batches),
            PLAIN_WANDA: lambda: plain_wanda(model, batches),
        },
        "50 % per output row": {
            KOOPFAST_ROWS: lambda: scores.masks(0.5),
            PLAIN_ROWS: lambda: rows_sort(tensors, 0.5),
        },
        "2:4 along inputs": {
            KOOPFAST_NM: lambda: kf.masks.nm_masks(scores, 2, 4, model=model),
            PLAIN_NM: lambda: nm_vectorized(tensors, 2, 4),
            LOOP_NM: lambda: nm_loop(tensors, 2, 4),
        },
        "50 % global": {
            KOOPFAST_GLOBAL: lambda: kf.masks.global_topk(scores, 0.5),
            PLAIN_GLOBAL: lambda: global_topk_plain(tensors, 0.5),
        },
    }
    comparison = {"50 % per output row": 0, "2:4 along inputs": 4, "50 % global": None}
    for group, fns in calls.items():
        if group == "Wanda scores":
            continue
        first, *others = fns
        want = fns[first]()
        for other in others:
            _check(other, fns[other](), want, tensors, comparison[group])
    return calls


def run_case(case: LlmCase, repeat: int | None) -> list[Row]:
    model, batches = build(case)
    calls = methods(model, batches)
    n = sum(m.weight.numel() for m in conv1d_layers(model).values())
    rows: list[Row] = []
    for group, fns in calls.items():
        label = f"{group}, {case.name}" if group == "Wanda scores" else f"{group}, {n / 1e6:.2f} M scores"
        group_rows = []
        for method, fn in fns.items():
            slow = group == "Wanda scores" or method == LOOP_NM
            group_rows.append(
                measure(
                    fn,
                    family=FAMILY,
                    case=label,
                    method=method,
                    n=n,
                    device=torch.device("cpu"),
                    repeat=repeat or (3 if slow else 5),
                )
            )
        rows += fill_ratios(group_rows, METHODS[group][1])
    return rows


def run(device: torch.device, *, quick: bool = False, repeat: int | None = None) -> list[Row]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("llm: skipped (transformers is not installed: pip install transformers)")
        return []
    if device.type != "cpu":
        print("llm: runs on the CPU only")
    return [row for case in cases(quick) for row in run_case(case, repeat)]

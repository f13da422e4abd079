"""Pruning a small Llama-style language model: magnitude, Wanda and gradient flow, 50 % and 2:4.

A character-level Llama (Hugging Face ``LlamaConfig``: a few decoder blocks, grouped-query
attention, random initial weights, nothing downloaded) is trained briefly with AdamW on the
text of this repository's README.md and docs/*.md and the docstrings of some Python standard-library
modules (every 10th block of 1024 characters held out).
The linear layers of its decoder blocks are then pruned, from the trained weights each time:

* 50 % unstructured: magnitude |θ| and gradient-norm preservation |θ ⊙ Hḡ| (gradient flow,
  exact Hessian-gradient products) at 50 % of every layer; Wanda |W|·‖X‖ at 50 % of every output
  row (the paper's comparison groups); Wanda with OWL's outlier-weighted layer budgets;
* 2:4: two of every four consecutive inputs kept (``kf.masks.nm_masks``), from each score;

and the held-out perplexity is measured right after pruning and after a short masked fine-tune
(``kf.masks.Masked``: AdamW, pruned weights exactly zero). Written to ``--out``: results.md (the
table), results.json, llm_pruning.png, and the Wanda 2:4 model in the compressed-tensors bitmask
format (``wanda_2of4/``: model.safetensors and config.json).

One seed and a tiny model: the table shows what each criterion does here, not which is better.

    python examples/llm_pruning.py --out llm_pruning [--train 1500] [--fine-tune 100] [--width 96]
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
import time
from pathlib import Path

import torch
from torch import nn

import koopfast as kf

ROOT = Path(__file__).resolve().parents[1]
SPARSITY = 0.5


STDLIB = (
    "argparse",
    "collections",
    "functools",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "re",
    "statistics",
    "string",
    "textwrap",
    "dataclasses",
    "unittest",
    "subprocess",
    "threading",
    "email.message",
    "http.client",
)


def corpus() -> str:
    """README.md and docs/*.md of this repository, then the docstrings of a fixed list of Python
    standard-library modules and their public classes, functions and methods (enough text that
    the small model does not overfit in a few hundred steps; the docstrings vary a little between
    Python versions)."""
    import importlib
    import inspect

    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    parts = [p.read_text(encoding="utf-8") for p in files if p.exists()]
    for name in STDLIB:
        module = importlib.import_module(name)
        objects = [module] + [getattr(module, a) for a in sorted(vars(module)) if not a.startswith("_")]
        for obj in objects:
            if obj is not module and getattr(obj, "__module__", None) != module.__name__:
                continue  # imported from elsewhere
            members = [obj] + (
                [getattr(obj, a) for a in sorted(vars(obj)) if not a.startswith("_")] if inspect.isclass(obj) else []
            )
            parts += [doc for m in members if (callable(m) or inspect.ismodule(m)) and (doc := inspect.getdoc(m))]
    return "\n\n".join(parts)


class Chars:
    """Character-level tokens: train and held-out id sequences."""

    def __init__(self, text: str, every: int = 10, chunk: int = 1024):
        self.alphabet = sorted(set(text))
        index = {c: i for i, c in enumerate(self.alphabet)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        chunks = list(ids.split(chunk))  # every 10th chunk of 1024 characters held out
        self.train = torch.cat([c for i, c in enumerate(chunks) if i % every != every - 1])
        self.test = torch.cat([c for i, c in enumerate(chunks) if i % every == every - 1])

    def batches(self, n: int, size: int, length: int, seed: int) -> list[torch.Tensor]:
        """n batches of ``size`` random windows of ``length`` training characters."""
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(self.train) - length, (n, size), generator=gen)
        return [torch.stack([self.train[s : s + length] for s in row.tolist()]) for row in starts]


def build(vocab: int, width: int, layers: int, length: int, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=length,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def perplexity(model: nn.Module, ids: torch.Tensor, length: int) -> float:
    """exp of the mean next-character cross-entropy over non-overlapping held-out windows."""
    windows = ids[: len(ids) // length * length].view(-1, length)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(32):
            n = chunk.numel() - chunk.shape[0]  # predicted positions
            total += float(lm_loss(model, chunk)) * n
            count += n
    model.train(was_training)
    return math.exp(total / count)


def train(model: nn.Module, batches: list[torch.Tensor], lr: float, masks=None) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if masks is None:
        for ids in batches:
            opt.zero_grad()
            lm_loss(model, ids).backward()
            opt.step()
    else:
        with kf.masks.Masked(model, masks, opt):
            for ids in batches:
                opt.zero_grad()
                lm_loss(model, ids).backward()
                opt.step()
        for name, mask in masks.items():  # what Masked promises
            assert bool((model.get_parameter(name)[~mask] == 0).all()), name
    model.eval()


def run(
    out: Path | None = None,
    *,
    train_steps: int = 1500,
    fine_tune: int = 100,
    width: int = 96,
    layers: int = 3,
    length: int = 64,
    batch: int = 16,
    seed: int = 0,
) -> dict:
    start = time.perf_counter()
    data = Chars(corpus())
    model = build(len(data.alphabet), width, layers, length, seed)
    train(model, data.batches(train_steps, batch, length, seed), lr=3e-3)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    dense = perplexity(model, data.test, length)
    # control: the dense model given the same extra steps as each pruned one (still improving?)
    train(model, data.batches(fine_tune, batch, length, seed + 2), lr=1e-3)
    dense_tuned = perplexity(model, data.test, length)
    model.load_state_dict(trained)

    calibration = data.batches(8, batch, length, seed + 1)
    wanda = kf.criteria.wanda(model, calibration)
    names = [n for n in wanda if n.startswith("model.layers.")]  # the decoder blocks' linear layers
    wanda = wanda.only(names)
    weights = {n: model.get_parameter(n) for n in names}
    flow = kf.criteria.gradient_flow(model, lm_loss, calibration, hvp="exact", params=weights)
    magnitude = kf.criteria.magnitude(weights)
    gradflow = flow.scores("gradient_norm_preservation")
    owl = kf.masks.owl_sparsities(wanda, SPARSITY, lam=0.08, m=5.0)
    plans = {
        "magnitude": (kf.masks.layerwise_topk(magnitude, SPARSITY), kf.masks.nm_masks(magnitude, 2, 4)),
        "Wanda": (wanda.masks(SPARSITY), kf.masks.nm_masks(wanda, 2, 4)),
        "Wanda + OWL budgets": (wanda.masks(owl), None),
        "gradient flow θ·Hg": (kf.masks.layerwise_topk(gradflow, SPARSITY), kf.masks.nm_masks(gradflow, 2, 4)),
    }
    rows = {}
    for criterion, plan in plans.items():
        rows[criterion] = {}
        for kind, masks in zip(("50%", "2:4"), plan):
            if masks is None:
                continue
            model.load_state_dict(trained)
            kf.masks.apply_(model, masks)
            pruned = perplexity(model, data.test, length)
            train(model, data.batches(fine_tune, batch, length, seed + 2), lr=1e-3, masks=masks)
            kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
            rows[criterion][kind] = {
                "pruned": pruned,
                "fine_tuned": perplexity(model, data.test, length),
                "sparsity": 1 - kept,
            }
            if out is not None and criterion == "Wanda" and kind == "2:4":
                model.load_state_dict(trained)
                kf.masks.export_compressed(model, masks, Path(out) / "wanda_2of4")
    result = {
        "dense": dense,
        "dense_fine_tuned": dense_tuned,
        "characters": {"train": len(data.train), "held_out": len(data.test), "alphabet": len(data.alphabet)},
        "model": {"width": width, "layers": layers, "parameters": sum(p.numel() for p in model.parameters())},
        "pruned_parameters": sum(model.get_parameter(n).numel() for n in names),
        "steps": {"train": train_steps, "fine_tune": fine_tune},
        "owl_range": [min(owl.values()), max(owl.values())],
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    if out is not None:
        write(result, Path(out))
    return result


def table(r: dict) -> str:
    lines = [
        f"Held-out perplexity (character level, {r['characters']['held_out']} characters; dense "
        f"{r['dense']:.2f}, {r['dense_fine_tuned']:.2f} after the same fine-tuning steps unpruned; "
        f"{r['model']['layers']} blocks, width {r['model']['width']}, "
        f"{r['model']['parameters']:,} parameters, {r['pruned_parameters']:,} of them in the pruned layers). "
        f"Each cell: right after pruning / after {r['steps']['fine_tune']} masked fine-tuning steps.",
        "",
        "| criterion | 50 % unstructured | 2:4 |",
        "|---|---|---|",
    ]
    for criterion, row in r["rows"].items():
        cells = [f"{row[k]['pruned']:.2f} / {row[k]['fine_tuned']:.2f}" if k in row else "" for k in ("50%", "2:4")]
        lines.append(f"| {criterion} | {cells[0]} | {cells[1]} |")
    lo, hi = r["owl_range"]
    lines += ["", f"OWL budgets (λ = 0.08, M = 5): {lo:.1%} to {hi:.1%} per block, 50.0 % overall."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> Path:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [(c, k) for c, row in r["rows"].items() for k in row]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    pruned = [r["rows"][c][k]["pruned"] for c, k in labels]
    tuned = [r["rows"][c][k]["fine_tuned"] for c, k in labels]
    ax.bar([i - 0.2 for i in x], pruned, 0.4, label="right after pruning", color="C1", alpha=0.6)
    ax.bar([i + 0.2 for i in x], tuned, 0.4, label="after masked fine-tuning", color="C0")
    ax.axhline(r["dense"], color="k", ls=":", lw=1, label=f"dense ({r['dense']:.2f})")
    ax.axhline(
        r["dense_fine_tuned"], color="k", ls="--", lw=1, label=f"dense, same extra steps ({r['dense_fine_tuned']:.2f})"
    )
    ax.set_xticks(list(x), [f"{textwrap.fill(c, 14)}\n{k}" for c, k in labels], fontsize=7)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("Character-level Llama pruned to 50 % (unstructured) and 2:4")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(r: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table(r), encoding="utf-8")
    (out / "results.json").write_text(json.dumps(r, indent=2), encoding="utf-8")
    plot(r, out / "llm_pruning.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("llm_pruning"), help="folder for the table, plot, export")
    parser.add_argument("--train", type=int, default=1500, help="AdamW training steps before pruning")
    parser.add_argument("--fine-tune", type=int, default=100, help="masked AdamW steps after pruning")
    parser.add_argument("--width", type=int, default=96, help="hidden size (a multiple of 8)")
    parser.add_argument("--layers", type=int, default=3, help="decoder blocks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    r = run(
        args.out, train_steps=args.train, fine_tune=args.fine_tune, width=args.width, layers=args.layers, seed=args.seed
    )
    print(table(r))
    print(f"written to {args.out}/ in {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()

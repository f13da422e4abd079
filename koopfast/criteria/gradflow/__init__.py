"""Gradient-flow criteria (Lubana & Dick, ICLR 2021): operands g and Hg, then any measure.

Modules: :mod:`.measures` (each measure a strategy object: score, per-unit reduction, fused
selection), :mod:`.estimate` (the operands, with one estimator strategy for replicated or
FSDP2-sharded parameters), :mod:`.flow` (the result and its scores), :mod:`.api`
(:func:`gradient_flow`, the named criteria), :mod:`.presets` (the authors' settings).

``gradient_flow(model, loss_fn, batches)`` accumulates, over all batches and with constant memory
(one running sum per parameter, no per-batch copies):

* ḡ, the gradient of the loss averaged over the batches (weighted by batch size, so a
  mean-reduced loss over several batches gives exactly the gradient of one big batch);
* optionally E[g_b²] over batches (for the Fisher measure);
* optionally Hḡ, the Hessian of the averaged loss times ḡ, as the authors compute it: ḡ first,
  then H_b ḡ batch by batch (not the average of H_b g_b). ``hvp="exact"`` uses double
  backpropagation (a second-order graph per batch: exact, memory ≈ 2-3 × a training step; run
  with PyTorch's math attention backend, so SDPA transformers work); ``hvp="finite_difference"``
  uses (∇L(θ + hḡ) − ∇L(θ − hḡ)) / 2h, two ordinary backward passes per batch with no
  second-order graph. Its step is chosen by a self-check on the first batch (steps h₀·10⁻ᵏ, the
  one whose difference to the next is smallest) that raises when even the best step's estimated
  error exceeds ``fd_tol`` (5 %): no silent garbage where the gradient has kinks within every
  step. Measured on float32 models built from configs (4 layers, width 128, 4 batches of 8;
  bench/RESULTS.md, "Hḡ on transformers"), true relative error at the chosen step against a
  float64 double-backward reference: GPT-2, BERT, Llama (GQA) 1.2e-4, ViT 2.2e-4 (the estimates
  1.9-8.3× above); nn.TransformerEncoder with ReLU: 6.3e-2, estimate 7.8e-2, refused. On the
  model-zoo's smaller configs (tests/zoo): 5e-5 to 1.4e-3, ResNet and MobileNetV2 included.
  Float64 models: ~1e-10.

The measures, per parameter θ_i (unstructured) or per output unit f (``granularity="filter"``,
aggregated as in the authors' code):

=========================== ===================== ===================================
measure                     unstructured          per filter
=========================== ===================== ===================================
magnitude                   |θ|                   ‖θ_f‖₂
loss_preservation           |θ g|                 Σ |θ g|      (variant "tfo": |Σ θ g|)
biased_loss_preservation    θ² |g|                Σ θ² |g|
gradient_norm_preservation  |θ Hg|                |θ_fᵀ (Hg)_f|
grasp                       θ Hg (signed)         θ_fᵀ (Hg)_f
fisher                      θ² E[g²]              Σ θ² E[g²]
=========================== ===================== ===================================

Higher scores are kept; GraSP's signed scores mean the most negative θᵀHg is pruned first, as in
GraSP. Unstructured masks can come straight from the operands, scores never materialised:
``GradientFlow.masks`` hands (θ, g) or (θ, Hg) to the selection kernel.

Data-parallel scoring (``process_group``, or a ``DistributedDataParallel`` model): every process
holds the whole model and iterates its own batches; every process gets the result of one process
on all of them. The batch-weighted sums are all-reduced: ḡ and the counts first (one all-reduce of
N floats, 2N with ``fisher``), then each process sums its own w_b H_b ḡ with the global ḡ and
those are all-reduced (N floats).

Sharded parameters (FSDP2's ``fully_shard``: DTensor ``Shard(0)``, detected): FSDP all-gathers θ
for each forward pass and reduce-scatters gradients in ``.backward()``, so ḡ comes from one
``backward()`` per batch and each process keeps its rows; Hḡ by finite differences only (each
process moves its rows of θ; double backpropagation does not reach sharded parameters), no Fisher
(only the sum of the processes' gradients exists). Every process must pass the same number of
batches (each backward pass is collective); the results are DTensors placed like the parameters.
"""

from koopfast.criteria.gradflow._finite_difference import FD_RUNGS, FD_TOLERANCE
from koopfast.criteria.gradflow.api import (
    biased_loss_preservation,
    cross_entropy,
    fisher,
    gradient_flow,
    gradient_norm_preservation,
    grasp,
    loss_preservation,
)
from koopfast.criteria.gradflow.flow import GradientFlow, GradientFlowScores
from koopfast.criteria.gradflow.measures import ALL_MEASURES, BN_MEASURES, MEASURES
from koopfast.criteria.gradflow.presets import PRESETS, FlowAndPrune

__all__ = [
    "ALL_MEASURES",
    "BN_MEASURES",
    "FD_RUNGS",
    "FD_TOLERANCE",
    "MEASURES",
    "PRESETS",
    "FlowAndPrune",
    "GradientFlow",
    "GradientFlowScores",
    "biased_loss_preservation",
    "cross_entropy",
    "fisher",
    "gradient_flow",
    "gradient_norm_preservation",
    "grasp",
    "loss_preservation",
]

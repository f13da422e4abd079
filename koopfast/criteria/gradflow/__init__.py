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
  one whose difference to the next is smallest), then confirmed on every batch (the difference
  quotients at the chosen h and at h/10 over all batches; 2 more backward passes per batch): it
  raises when either estimated error exceeds ``fd_tol`` (5 %). The first batch alone is not
  enough: on ReLU networks the step may cross kinks in other batches only (measured: a float64
  ReLU convnet passed the first-batch check at 1.6e-10 while its four-batch Hḡ was off by 22×;
  now refused). Measured with ``fd_step="auto"`` against float64 double backpropagation
  (tests/api/test_criteria_gradflow.py, ``test_finite_difference_is_accurate_or_refused``: 3
  seeds, 4 batches of 16; MLP 12-32-32-3 with Tanh and with ReLU, a ReLU convnet, a
  Conv-BN-ReLU-maxpool convnet): every accepted estimate was within 1e-3 relative in float32
  (Tanh MLP 1.3-2.2e-4, ReLU convnets 4.6e-4 to 2.9e-3) and 4.6e-10 in float64; every estimate
  off by more than 5 % was refused (float32 ReLU MLP 0.34-3.2 on all three seeds, convnets
  1.8-5.3, float64 ReLU convnet 22); one float32 convnet estimate (true 2.9e-3, estimated 6.6e-2)
  was refused although usable. Float64 ReLU models are fine where no kink is crossed — the
  earlier "~1e-11, ReLU ones included" held only for the first batch. On float32 transformers
  built from configs (4 layers, width 128, 4 batches of 8; bench/RESULTS.md, "Hḡ on
  transformers", measured before the every-batch confirmation): GPT-2, BERT, Llama (GQA) 1.2e-4,
  ViT 2.2e-4; nn.TransformerEncoder with ReLU 6.3e-2, refused; the model zoo's smaller configs
  (tests/zoo): 5e-5 to 1.4e-3, ResNet and MobileNetV2 included.

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

"""preset="flowandprune" against an independent float64 transcription of the authors' math.

The transcription below is written from the paper (Lubana & Dick, ICLR 2021) and
shared/docs/papers.md's description of their released code (flowandprune, imp_estimator.py and
main.py's defaults), with plain torch.autograd on ``model.parameters()`` as lists, the way their
code works on lists, none of koopfast's code:

* g and E[g²]: cross-entropy of logits / 5, eval mode, whole batches until 2560 samples
  (here ``samples``), each batch's gradient weighted by its size;
* Hg: the first samples // classes samples of each class, one batch per class; ḡ over every
  parameter at the Hg temperature (200 for grasp, 1 for grad_preserve) as the mean of the class
  gradients, then the mean over classes of ∇(g_cᵀ stop(ḡ)) over every parameter (BatchNorm too);
* per output filter f of each weight: the measure table of papers.md, nvidia = γ² E[g_γ²] +
  β² E[g_β²] of the BatchNorm after the layer, bn = |γ|, biased_loss with distance from init
  Σ |θ − θ₀| |θ g|.

Rounding bounds (float64, relative to each layer's largest score), as measured: magnitude, bn,
grasp and gradient_norm_preservation are bit-identical (asserted with torch.equal; for Hḡ because
koopfast's size-weighted mean Σ n g_c / nC is exact here, n = 32 a power of two; with other class
sizes expect a few ulps). The g-based measures (loss_preservation, tfo, biased_loss with and
without init, fisher, nvidia) differ by at most 5e-16 relative (bound asserted: 2e-15): koopfast
accumulates Σ n_b g_b with one fused ``add_(g, alpha=n)``, the transcription as ``t + g·n``, two
roundings.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import koopfast as kf

SAMPLES = 96  # the preset's imp_samples, scaled down (2560 in the authors' main.py): 32 per class
CLASSES = 3
G_BOUND = 2e-15  # measured at most 5e-16: see the module docstring
EXACT = ("magnitude", "grasp", "gradient_norm_preservation")  # and "bn"
G_MEASURES = ("magnitude", "loss_preservation", "tfo", "biased_loss_preservation", "init", "fisher")
HG_MEASURES = ("grasp", "gradient_norm_preservation")


def conv_bn_relu():
    """Conv → BN → ReLU → max-pool, twice, then a classifier (the common layout)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, CLASSES),
    ).double()


def conv_relu_bn():
    """Conv → ReLU → BN (flowandprune's VGG, models.py)."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(4),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(6),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, CLASSES),
    ).double()


def mlp():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, CLASSES)).double()


MODELS = {"conv-bn-relu": conv_bn_relu, "conv-relu-bn": conv_relu_bn, "mlp": mlp}


def data_for(model, n_batches=6, size=20):
    gen = torch.Generator().manual_seed(3)
    shape = (12,) if isinstance(model[0], nn.Linear) else (3, 8, 8)
    return [
        (torch.randn(size, *shape, generator=gen, dtype=torch.float64), torch.randint(CLASSES, (size,), generator=gen))
        for _ in range(n_batches)
    ]


def warm_batchnorm(model, batches):
    """Running statistics that are not the initial ones, so that eval mode matters."""
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    model.eval()


# ---- the transcription ------------------------------------------------------------------------------


def ce(model, x, y, temperature):
    return nn.functional.cross_entropy(model(x) / temperature, y)


def transcribed_g(model, batches, temperature, square=False):
    """Σ n_b g_b (or g_b²) / Σ n_b over whole batches until SAMPLES samples, every parameter."""
    model.eval()
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    seen = 0.0
    for x, y in batches:
        if seen >= SAMPLES:
            break
        grads = torch.autograd.grad(ce(model, x, y, temperature), params)
        total = [t + (g.pow(2) if square else g) * float(len(x)) for t, g in zip(total, grads)]
        seen += float(len(x))
    return [t / seen for t in total]


def transcribed_hg(model, batches, temperature):
    """Class batches (the first SAMPLES // CLASSES of each class), ḡ as their mean gradient, then
    the mean over classes of the gradient of g_cᵀ ḡ, over every parameter."""
    model.eval()
    per = SAMPLES // CLASSES
    xs, ys = [[] for _ in range(CLASSES)], [[] for _ in range(CLASSES)]
    for x, y in batches:
        for i in range(len(y)):
            c = int(y[i])
            if len(xs[c]) < per:
                xs[c].append(x[i : i + 1])
                ys[c].append(y[i : i + 1])
    classes = [(torch.cat(a), torch.cat(b)) for a, b in zip(xs, ys)]
    params = list(model.parameters())
    g_bar = [torch.zeros_like(p) for p in params]
    for x, y in classes:
        g_bar = [a + g for a, g in zip(g_bar, torch.autograd.grad(ce(model, x, y, temperature), params))]
    g_bar = [a / CLASSES for a in g_bar]
    hg = [torch.zeros_like(p) for p in params]
    for x, y in classes:
        model.zero_grad()
        grads = torch.autograd.grad(ce(model, x, y, temperature), params, create_graph=True)
        sum((g * v).sum() for g, v in zip(grads, g_bar)).backward()
        hg = [a + (p.grad if p.grad is not None else 0.0) for a, p in zip(hg, params)]
    return [a / CLASSES for a in hg]


def rows(t):
    return t.reshape(t.shape[0], -1)


def transcribed_scores(model, measure, init=None):
    """Per output unit of every 2+-dimensional weight, keyed by name (the authors' cal_importance_*)."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach() for p in model.parameters()]
    if measure in HG_MEASURES:
        other = transcribed_hg(model, data, 200.0 if measure == "grasp" else 1.0)
    elif measure in ("fisher", "nvidia"):
        other = transcribed_g(model, data, 5.0, square=True)
    elif measure != "magnitude":
        other = transcribed_g(model, data, 5.0)
    out = {}
    for i, (name, t) in enumerate(zip(names, theta)):
        if t.dim() < 2:
            continue
        w = rows(t)
        if measure == "magnitude":
            out[name] = w.norm(2, 1)
            continue
        out[name] = per_filter(measure, w, rows(other[i]), None if init is None else rows(init[name]))
    return out


def per_filter(measure, w, b, w0):
    if measure == "loss_preservation":
        return (w * b).abs().sum(1)
    if measure == "tfo":
        return (w * b).sum(1).abs()
    if measure == "biased_loss_preservation":
        return (w.pow(2) * b).abs().sum(1)
    if measure == "init":
        return ((w - w0).abs() * (w * b).abs()).sum(1)
    if measure == "grasp":
        return (w * b).sum(1)
    if measure == "gradient_norm_preservation":
        return (w * b).sum(1).abs()
    return (w.pow(2) * b).sum(1)  # fisher


def transcribed_bn(model, measure):
    """nvidia (γ² E[g_γ²] + β² E[g_β²]) and bn (|γ|) of the BatchNorm after each conv, keyed by
    the conv's weight name."""
    named = dict(model.named_parameters())
    g2 = dict(zip(named, transcribed_g(model, data, 5.0, square=True)))
    modules = list(model.named_children())
    out = {}
    for i, (name, layer) in enumerate(modules):
        if not isinstance(layer, nn.Conv2d):
            continue
        bn_name = next(n for n, m in modules[i + 1 :] if isinstance(m, nn.BatchNorm2d))
        gamma, beta = named[f"{bn_name}.weight"].detach(), named[f"{bn_name}.bias"].detach()
        if measure == "bn":
            out[f"{name}.weight"] = gamma.abs()
        else:
            out[f"{name}.weight"] = gamma.pow(2) * g2[f"{bn_name}.weight"] + beta.pow(2) * g2[f"{bn_name}.bias"]
    return out


# ---- the comparison -----------------------------------------------------------------------------------

data: list = []  # the batches of the model under test (the transcription reads them)


def koopfast_scores(model, measure, init=None):
    preset = kf.criteria.FlowAndPrune(samples=SAMPLES, classes=CLASSES)
    name, variant = {"tfo": ("loss_preservation", "tfo"), "init": ("biased_loss_preservation", "init")}.get(
        measure, (measure, "abs")
    )
    flow = kf.criteria.gradient_flow(model, None, data, preset=preset, measure=name)
    return flow.scores(name, "filter", variant=variant, init=init)


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def model(request):
    m = MODELS[request.param]()
    data[:] = data_for(m)
    if request.param != "mlp":
        warm_batchnorm(m, data)
    return m


@pytest.mark.parametrize("measure", G_MEASURES + HG_MEASURES)
def test_every_weight_measure_matches_the_transcription(model, measure):
    init = None
    if measure == "init":
        gen = torch.Generator().manual_seed(4)
        init = {
            n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            for n, p in model.named_parameters()
            if p.dim() >= 2
        }
    want = transcribed_scores(model, measure, init)
    init_all = None if init is None else {**{n: p.detach() for n, p in model.named_parameters()}, **init}
    got = koopfast_scores(model, measure, init_all)
    assert list(got) == list(want)
    for n in want:
        if measure in EXACT:
            assert torch.equal(got[n], want[n]), (measure, n)
        else:
            assert (got[n] - want[n]).abs().max() <= G_BOUND * want[n].abs().max(), (measure, n)


@pytest.mark.parametrize("measure", ["nvidia", "bn"])
@pytest.mark.parametrize("make", [conv_bn_relu, conv_relu_bn], ids=["conv-bn-relu", "conv-relu-bn"])
def test_batchnorm_measures_match_the_transcription(make, measure):
    m = make()
    data[:] = data_for(m)
    warm_batchnorm(m, data)
    want = transcribed_bn(m, measure)
    if measure == "bn":
        flow = kf.criteria.gradient_flow(m, None, data, preset="flowandprune", measure="magnitude", source="bn")
        got = flow.scores("magnitude", "filter")
    else:
        got = koopfast_scores(m, "nvidia")
    assert got.source == "bn" and list(got) == list(want)
    for n in want:
        if measure == "bn":
            assert torch.equal(got[n], want[n]), n
        else:
            assert (got[n] - want[n]).abs().max() <= G_BOUND * want[n].abs().max(), (measure, n)


def test_the_default_differs_from_the_preset_where_documented():
    """Hḡ over the scored tensors only (the default) moves GraSP scores on a BatchNorm convnet;
    hvp_params="all" is the authors' choice."""
    m = conv_bn_relu()
    data[:] = data_for(m)
    warm_batchnorm(m, data)
    loss = kf.criteria.cross_entropy(200)
    default = kf.criteria.gradient_flow(m, loss, data, hvp="exact").scores("grasp", "filter")
    everything = kf.criteria.gradient_flow(m, loss, data, hvp="exact", hvp_params="all").scores("grasp", "filter")
    moved = [((default[n] - everything[n]).norm() / everything[n].norm()).item() for n in default]
    assert max(moved) > 1e-2, moved


def test_preset_errors():
    m = conv_bn_relu()
    data[:] = data_for(m)
    fn = "koopfast.criteria.gradient_flow"
    with pytest.raises(ValueError, match=rf"{fn}: preset='flowandprune' fixes the loss"):
        kf.criteria.gradient_flow(m, kf.criteria.cross_entropy(), data, preset="flowandprune", measure="grasp")
    with pytest.raises(ValueError, match=rf"{fn}: preset='flowandprune' sets \['hvp'\] itself"):
        kf.criteria.gradient_flow(m, None, data, preset="flowandprune", measure="grasp", hvp="exact")
    with pytest.raises(ValueError, match=rf"{fn}: preset='flowandprune' needs measure= one of"):
        kf.criteria.gradient_flow(m, None, data, preset="flowandprune")
    with pytest.raises(ValueError, match=rf"{fn}: expected preset None, one of \['flowandprune'\]"):
        kf.criteria.gradient_flow(m, None, data, preset="snip", measure="grasp")
    with pytest.raises(ValueError, match=r"needs 200 samples of each of 3 classes for Hḡ; the data runs out short"):
        kf.criteria.gradient_flow(
            m, None, data, preset=kf.criteria.FlowAndPrune(samples=600, classes=3), measure="grasp"
        )
    with pytest.raises(ValueError, match=r"koopfast.criteria.FlowAndPrune: expected temperature to be a positive"):
        kf.criteria.FlowAndPrune(temperature=0)

"""Gradient-flow criteria against independent float64 references (torch.autograd.functional.hvp)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import koopfast as kf
from koopfast.criteria.gradflow import MEASURES

NEEDS_HG = {"gradient_norm_preservation", "grasp"}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def convnet():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.Flatten(), nn.Linear(12, 3)
    ).double()


def batches_for(model, sizes=(8, 5, 11)):
    gen = torch.Generator().manual_seed(2)
    shape = (6,) if isinstance(model[0], nn.Linear) else (2, 6, 6)
    return [
        (torch.randn(n, *shape, generator=gen, dtype=torch.float64), torch.randint(3, (n,), generator=gen))
        for n in sizes
    ]


def one_big_batch(batches):
    return [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]


def reference_operands(model, batches):
    """ḡ and Hḡ of the loss over all data as one batch, the Hessian-vector product by
    torch.autograd.functional.hvp on a function of the flattened prunable parameters."""
    model.eval()
    x, y = one_big_batch(batches)[0]
    params = kf.criteria.magnitude(model)  # just the names
    names = list(params)
    shapes = [model.get_parameter(n).shape for n in names]
    flat0 = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])

    def loss(flat):
        pieces, start = {}, 0
        for n, s in zip(names, shapes):
            pieces[n] = flat[start : start + s.numel()].view(s)
            start += s.numel()
        return nn.functional.cross_entropy(functional_call(model, pieces, (x,)), y)

    g = torch.autograd.functional.jacobian(loss, flat0)
    _, hg = torch.autograd.functional.hvp(loss, flat0, g)

    def split(v):
        out, start = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[start : start + s.numel()].view(s)
            start += s.numel()
        return out

    return split(g), split(hg)


def expected_unstructured(measure, theta, g, hg, g2):
    return {
        "magnitude": theta.abs(),
        "loss_preservation": (theta * g).abs(),
        "biased_loss_preservation": theta * theta * g.abs(),
        "gradient_norm_preservation": (theta * hg).abs(),
        "grasp": theta * hg,
        "fisher": theta * theta * g2,
    }[measure]


@pytest.mark.parametrize("make", [mlp, convnet], ids=["mlp", "conv"])
def test_every_measure_against_the_float64_reference(make):
    model = make()
    batches = batches_for(model)
    g_ref, hg_ref = reference_operands(model, batches)
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches, hvp="exact", fisher=True)
    # E[g_b²] by hand, weighted by batch size
    g2_ref = {n: torch.zeros_like(v) for n, v in g_ref.items()}
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n in g2_ref:
            g2_ref[n] += model.get_parameter(n).grad.square() * len(x) / 24
    for n in g_ref:
        assert torch.allclose(flow.grad[n], g_ref[n], rtol=1e-10, atol=1e-13), n
        assert torch.allclose(flow.hg[n], hg_ref[n], rtol=1e-9, atol=1e-12), n
        assert torch.allclose(flow.grad_sq[n], g2_ref[n], rtol=1e-10, atol=1e-15), n
    for measure in MEASURES:
        scores = flow.scores(measure)
        for n, theta in flow.params.items():
            want = expected_unstructured(measure, theta, g_ref[n], hg_ref[n], g2_ref[n])
            assert torch.allclose(scores[n], want, rtol=1e-9, atol=1e-14), (measure, n)


def test_named_criteria_are_the_measures_of_gradient_flow():
    model = mlp()
    batches = batches_for(model)
    loss = kf.criteria.cross_entropy()
    flow = kf.criteria.gradient_flow(model, loss, batches, hvp="exact", fisher=True)
    named = {
        "loss_preservation": kf.criteria.loss_preservation,
        "biased_loss_preservation": kf.criteria.biased_loss_preservation,
        "gradient_norm_preservation": kf.criteria.gradient_norm_preservation,
        "grasp": kf.criteria.grasp,
        "fisher": kf.criteria.fisher,
    }
    for measure, fn in named.items():
        for granularity in ("unstructured", "filter"):
            got = fn(model, loss, batches, granularity=granularity)
            want = flow.scores(measure, granularity)
            assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in got), (measure, granularity)


def test_filter_scores_aggregate_the_elementwise_ones():
    model = convnet()
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches_for(model), hvp="exact", fisher=True)
    theta, g, hg = flow.params, flow.grad, flow.hg
    for measure in MEASURES:
        per_filter = flow.scores(measure, "filter")
        assert set(per_filter) == {"0.weight", "3.weight", "5.weight"}  # weights only; biases follow
        for n, s in per_filter.items():
            rows = theta[n].reshape(theta[n].shape[0], -1)
            if measure == "magnitude":
                want = rows.square().sum(1).sqrt()
            elif measure in ("gradient_norm_preservation", "grasp"):
                signed = (rows * hg[n].reshape(rows.shape)).sum(1)
                want = signed.abs() if measure == "gradient_norm_preservation" else signed
            else:
                want = flow.scores(measure)[n].reshape(rows.shape[0], -1).sum(1)
            assert s.shape == (theta[n].shape[0],) and torch.allclose(s, want, rtol=1e-12), (measure, n)
    tfo = flow.scores("loss_preservation", "filter", variant="tfo")
    for n, s in tfo.items():
        rows = theta[n].reshape(theta[n].shape[0], -1) * g[n].reshape(theta[n].shape[0], -1)
        assert torch.allclose(s, rows.sum(1).abs(), rtol=1e-12)
    assert torch.equal(
        kf.criteria.magnitude(model, granularity="filter")["0.weight"], flow.scores("magnitude", "filter")["0.weight"]
    )


def test_batches_accumulate_exactly_like_one_big_batch():
    model = mlp()
    batches = batches_for(model, sizes=(3, 9, 1, 7))
    loss = kf.criteria.cross_entropy()
    split = kf.criteria.gradient_flow(model, loss, batches, hvp="exact")
    whole = kf.criteria.gradient_flow(model, loss, one_big_batch(batches), hvp="exact")
    assert split.batches == 4 and split.samples == 20
    for n in split.grad:
        assert torch.allclose(split.grad[n], whole.grad[n], rtol=1e-12, atol=1e-15)
        assert torch.allclose(split.hg[n], whole.hg[n], rtol=1e-12, atol=1e-15)


def test_batches_may_be_a_generator():
    model = mlp()
    batches = batches_for(model)
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), iter(batches), hvp="exact")
    ref = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches, hvp="exact")
    assert all(torch.equal(flow.hg[n], ref.hg[n]) for n in ref.hg)


def relative_error(a, b):
    num = sum(float((a[n] - b[n]).square().sum()) for n in b) ** 0.5
    return num / sum(float(b[n].square().sum()) for n in b) ** 0.5


def test_finite_difference_hg_agrees_with_double_backward():
    """The documented trade-off: float64 models agree to ~1e-10 (ReLU ones too: with h ~ 1e-5 the
    step rarely crosses a kink); float32 smooth models to ~1e-4. (Float32 ReLU networks need a
    step large against rounding and small against kinks, and may not have one: check first.)"""
    loss = kf.criteria.cross_entropy()
    for make, tolerance in ((mlp, 1e-8), (convnet, 1e-8)):
        model = make()
        batches = batches_for(model)
        exact = kf.criteria.gradient_flow(model, loss, batches, hvp="exact")
        fd = kf.criteria.gradient_flow(model, loss, batches, hvp="finite_difference")
        assert relative_error(fd.hg, exact.hg) < tolerance, make.__name__
        assert all(torch.equal(p, model.get_parameter(n)) for n, p in exact.params.items()), "parameters restored"
    model = mlp().float()
    batches = [(x.float(), y) for x, y in batches_for(mlp())]
    exact = kf.criteria.gradient_flow(model, loss, batches, hvp="exact")
    fd = kf.criteria.gradient_flow(model, loss, batches, hvp="finite_difference")
    assert relative_error(fd.hg, exact.hg) < 1e-3


def test_grasp_prunes_the_most_negative_first():
    model = mlp()
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches_for(model), hvp="exact")
    scores = flow.scores("grasp")
    masks = kf.masks.global_topk(scores, 0.5)
    pruned = torch.cat([scores[n][~masks[n]] for n in scores])
    kept = torch.cat([scores[n][masks[n]] for n in scores])
    assert pruned.max() <= kept.min() and pruned.min() < 0
    assert float(pruned.min()) == float(torch.cat([s.reshape(-1) for s in scores.values()]).min())


@pytest.mark.parametrize("measure", MEASURES)
def test_fused_masks_equal_masks_from_materialised_scores(measure):
    model = convnet()
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches_for(model), hvp="exact", fisher=True)
    for scope, select in (("global", kf.masks.global_topk), ("layerwise", kf.masks.layerwise_topk)):
        fused = flow.masks(measure, 0.7, scope=scope)
        direct = select(flow.scores(measure), 0.7)
        assert all(torch.equal(fused[n], direct[n]) for n in direct), scope


def test_batchnorm_scales_as_the_scored_source():
    model = convnet()
    batches = batches_for(model)
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches, source="bn")
    assert flow.bn_scales == {"0.weight": "1.weight"}
    gamma = model[1].weight.detach()
    model.eval()
    model.zero_grad()
    x, y = one_big_batch(batches)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    want = (gamma * model[1].weight.grad).abs()
    got = flow.scores("loss_preservation", "filter")
    assert list(got) == ["0.weight"] and torch.allclose(got["0.weight"], want, rtol=1e-10)
    assert torch.allclose(flow.scores("magnitude", "filter")["0.weight"], gamma.abs())


def test_mode_is_restored_and_eval_is_used():
    model = convnet()
    model.train()
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches_for(model))
    assert model.training
    model.eval()
    ref = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches_for(model), eval_mode=False)
    assert all(torch.allclose(flow.grad[n], ref.grad[n]) for n in ref.grad)


def test_errors():
    model = mlp()
    batches = batches_for(model)
    loss = kf.criteria.cross_entropy()
    fn = "koopfast.criteria.gradient_flow"
    with pytest.raises(ValueError, match=rf"{fn}: expected at least one batch with samples, got none"):
        kf.criteria.gradient_flow(model, loss, [])
    with pytest.raises(
        ValueError, match=rf"{fn}: expected loss_fn to return a scalar loss .* got a tensor of shape \(8, 3\)"
    ):
        kf.criteria.gradient_flow(model, lambda m, b: m(b[0]), batches)
    with pytest.raises(ValueError, match=rf"{fn}: expected a loss that depends on the parameters"):
        kf.criteria.gradient_flow(model, lambda m, b: torch.tensor(1.0), batches)
    with pytest.raises(
        ValueError, match=rf"{fn}: expected the loss to depend on every scored parameter, but not on \['2.weight'"
    ):
        kf.criteria.gradient_flow(model, lambda m, b: m[0](b[0]).sum(), batches)
    with pytest.raises(ValueError, match=rf"{fn}: expected hvp None, 'exact' or 'finite_difference', got 'lanczos'"):
        kf.criteria.gradient_flow(model, loss, batches, hvp="lanczos")
    with pytest.raises(TypeError, match=rf"{fn}: expected loss_fn to be callable"):
        kf.criteria.gradient_flow(model, "ce", batches)
    with pytest.raises(
        ValueError, match=rf"{fn}: source='bn' needs conv/linear layers each followed by an affine BatchNorm"
    ):
        kf.criteria.gradient_flow(model, loss, batches, source="bn")
    frozen = mlp()
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=rf"{fn}: expected parameters that require grad, got '0.weight'"):
        kf.criteria.gradient_flow(frozen, loss, batches)
    flow = kf.criteria.gradient_flow(model, loss, batches)
    with pytest.raises(
        ValueError, match=r"scores\('grasp'\): needs Hg: compute the operands with gradient_flow\(..., hvp='exact'\)"
    ):
        flow.scores("grasp")
    with pytest.raises(ValueError, match=r"needs E\[g²\]: compute the operands with gradient_flow\(..., fisher=True\)"):
        flow.masks("fisher", 0.5)
    with pytest.raises(ValueError, match=r"expected a measure among"):
        flow.scores("snip")
    with pytest.raises(ValueError, match=r"variant 'tfo' applies to loss_preservation only"):
        flow.scores("magnitude", variant="tfo")
    with pytest.raises(ValueError, match=r"expected granularity 'unstructured' or 'filter', got 'channel'"):
        flow.scores("magnitude", "channel")
    with pytest.raises(ValueError, match=r"koopfast.criteria.cross_entropy: expected a positive temperature, got 0"):
        kf.criteria.cross_entropy(0)


def test_operands_do_not_change_when_the_model_trains_on():
    model = mlp()
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches_for(model))
    before = flow.scores("loss_preservation")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0)
    after = flow.scores("loss_preservation")
    assert all(torch.equal(before[n], after[n]) for n in before)


FD_MODELS = {
    "mlp-tanh": lambda: nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)),
    "mlp-relu": lambda: nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)),
    "conv-relu": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 3),
    ),
    "bn-convnet": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 2 * 2, 3),
    ),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(FD_MODELS))
def test_finite_difference_is_accurate_or_refused(name, dtype):
    """fd_step="auto" against float64 double backpropagation (the numbers in the package
    docstring): an accepted Hḡ is within the bound of its dtype, and one off by more than fd_tol is
    refused, never returned; some seeds of the ReLU models are refused (the checks can fail)."""
    accepted_bound = {torch.float32: 5e-3, torch.float64: 1e-9}[dtype]
    refused = 0
    for seed in range(3):
        torch.manual_seed(seed)
        model = FD_MODELS[name]().to(dtype)
        gen = torch.Generator().manual_seed(10 + seed)
        shape = (12,) if name.startswith("mlp") else (3, 8, 8)
        batches = [
            (torch.randn(16, *shape, generator=gen, dtype=dtype), torch.randint(3, (16,), generator=gen))
            for _ in range(4)
        ]
        if name == "bn-convnet":  # running statistics other than the initial ones
            with torch.no_grad():
                for x, _ in batches:
                    model(x)
        reference = FD_MODELS[name]().double()
        reference.load_state_dict(
            {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        )
        loss = kf.criteria.cross_entropy()
        exact = kf.criteria.gradient_flow(reference, loss, [(x.double(), y) for x, y in batches], hvp="exact").hg
        unchecked = kf.criteria.gradient_flow(model, loss, batches, hvp="finite_difference", fd_tol=float("inf"))
        error = (
            sum(((unchecked.hg[n].double() - exact[n]) ** 2).sum() for n in exact)
            / sum((h**2).sum() for h in exact.values())
        ).sqrt()
        try:
            flow = kf.criteria.gradient_flow(model, loss, batches, hvp="finite_difference")
        except ValueError as exc:
            assert "failed its self-check" in str(exc)
            refused += 1
            continue
        assert flow.fd_error <= kf.criteria.gradflow.FD_TOLERANCE
        assert error <= accepted_bound, (name, seed, float(error), flow.fd_error)
    if name == "mlp-relu" and dtype == torch.float32:
        assert refused == 3  # 0.34-3.2 relative at the chosen step on every seed


def test_scores_are_a_score_map_that_keeps_how_they_were_computed():
    model = convnet()
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches_for(model), measure="grasp")
    scores = flow.scores("loss_preservation", "filter", variant="tfo")
    assert isinstance(scores, kf.ScoreMap) and isinstance(scores, kf.criteria.GradientFlowScores)
    assert (scores.criterion, scores.measure, scores.granularity, scores.variant, scores.source) == (
        "loss_preservation",
        "loss_preservation",
        "filter",
        "tfo",
        "weights",
    )
    derived = scores.map(torch.neg)
    assert derived.variant == "tfo" and derived.granularity == "filter"
    assert flow.hg is not None  # measure="grasp" asked for Hḡ
    bn = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches_for(model), source="bn", fisher=True)
    assert bn.scores("nvidia", "filter").source == "bn"
    weights = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches_for(model), fisher=True)
    with pytest.raises(ValueError, match=r"needs the BatchNorm shifts' E\[g²\]: .*source='bn', fisher=True"):
        weights.scores("nvidia", "filter")
    with pytest.raises(ValueError, match=r"variant 'init' needs init="):
        flow.scores("biased_loss_preservation", "filter", variant="init")

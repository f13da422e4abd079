"""koopfast.prune against torch.nn.utils.prune itself, on the same models.

Without ties the masks are identical, and so is the whole module state (parameters, buffers,
their dtypes, the forward pre-hooks, forward outputs and gradients, prune.remove); with ties the
documented rule holds: the entries pruned are the last in (parameter order, flat index) order.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import koopfast as kf
from koopfast import prune as kf_prune


def make_model(device="cpu", dtype=torch.float32) -> nn.Module:
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.Flatten(), nn.Linear(6 * 6 * 6, 20), nn.Linear(20, 5)
    )
    return model.to(device=device, dtype=dtype)


def pairs(model: nn.Module, with_bias: bool = True) -> list[tuple[nn.Module, str]]:
    out = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out.append((m, "weight"))
            if with_bias:
                out.append((m, "bias"))
    return out


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
    for ma, mb in zip(a.modules(), b.modules()):
        hooks_a = [(type(h).__name__, getattr(h, "_tensor_name", None)) for h in ma._forward_pre_hooks.values()]
        hooks_b = [(type(h).__name__, getattr(h, "_tensor_name", None)) for h in mb._forward_pre_hooks.values()]
        assert hooks_a == hooks_b
        for name in ("weight", "bias"):
            if hasattr(ma, name + "_orig"):
                assert torch.equal(getattr(ma, name), getattr(mb, name)), name


def assert_same_behaviour(a: nn.Module, b: nn.Module, device="cpu") -> None:
    x = torch.randn(4, 3, 8, 8, device=device, dtype=next(a.parameters()).dtype)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa.grad, pb.grad), na


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.9, 1.0, 0, 1, 500, 2000])
def test_global_unstructured_equals_torch(device, amount):
    a = make_model(device)
    b = copy.deepcopy(a)
    torch_prune.global_unstructured(pairs(a), torch_prune.L1Unstructured, amount=amount)
    kf_prune.global_unstructured(pairs(b), torch_prune.L1Unstructured, amount=amount)
    assert_same_state(a, b)
    assert_same_behaviour(a, b, device)


def test_iterative_global_pruning_considers_only_unpruned_entries(device):
    a = make_model(device)
    b = copy.deepcopy(a)
    for amount, with_bias in [(0.5, True), (100, False), (0.4, True), (0.0, True), (7, True)]:
        torch_prune.global_unstructured(pairs(a, with_bias), torch_prune.L1Unstructured, amount=amount)
        kf_prune.global_unstructured(pairs(b, with_bias), kf_prune.L1Unstructured, amount=amount)
        assert_same_state(a, b)
    assert_same_behaviour(a, b, device)
    for (ma, name), (mb, _) in zip(pairs(a), pairs(b)):  # torch's remove works on the state koopfast leaves
        torch_prune.remove(ma, name)
        kf_prune.remove(mb, name)
    assert_same_state(a, b)
    assert not kf_prune.is_pruned(b)


def test_mixing_torch_and_koopfast_pruning_calls(device):
    a = make_model(device)
    b = copy.deepcopy(a)
    layers_a = [m for m in a.modules() if isinstance(m, nn.Linear)]
    layers_b = [m for m in b.modules() if isinstance(m, nn.Linear)]
    torch_prune.l1_unstructured(layers_a[0], "weight", amount=0.3)
    torch_prune.l1_unstructured(layers_b[0], "weight", amount=0.3)
    torch_prune.global_unstructured(pairs(a), torch_prune.L1Unstructured, amount=0.5)
    kf_prune.global_unstructured(pairs(b), torch_prune.L1Unstructured, amount=0.5)
    torch_prune.ln_structured(layers_a[1], "weight", amount=0.4, n=2, dim=0)
    torch_prune.ln_structured(layers_b[1], "weight", amount=0.4, n=2, dim=0)
    assert_same_state(a, b)
    assert_same_behaviour(a, b, device)


def test_importance_scores_and_remove(device):
    a = make_model(device)
    b = copy.deepcopy(a)
    gen = torch.Generator().manual_seed(3)
    scores_a = {(m, n): torch.rand(getattr(m, n).shape, generator=gen).to(device) for m, n in pairs(a)}
    scores_b = {(mb, n): scores_a[(ma, n)] for (ma, n), (mb, _) in zip(pairs(a), pairs(b))}
    torch_prune.global_unstructured(pairs(a), torch_prune.L1Unstructured, importance_scores=scores_a, amount=0.7)
    kf_prune.global_unstructured(pairs(b), torch_prune.L1Unstructured, importance_scores=scores_b, amount=0.7)
    assert_same_state(a, b)
    for (ma, n), (mb, _) in zip(pairs(a), pairs(b)):
        torch_prune.remove(ma, n)
        kf_prune.remove(mb, n)
    assert_same_state(a, b)
    assert not kf_prune.is_pruned(b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_other_dtypes_equal_torch(dtype):
    a = make_model(dtype=dtype)
    # distinct magnitudes, exact in low precision (per binade as many as the mantissa holds): no ties
    per_binade = {torch.float64: 1 << 20, torch.float16: 1 << 10, torch.bfloat16: 1 << 7}[dtype]
    n = sum(p.numel() for p in a.parameters())
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(torch.float64)
    values = (per_binade + idx % per_binade) * torch.exp2(torch.div(idx, per_binade, rounding_mode="floor") - 16)
    values = values * (torch.randint(2, (n,), generator=torch.Generator().manual_seed(2)) * 2 - 1)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(values[: p.numel()].reshape(p.shape).to(dtype))
            values = values[p.numel() :]
    b = copy.deepcopy(a)
    torch_prune.global_unstructured(pairs(a), torch_prune.L1Unstructured, amount=0.6)
    kf_prune.global_unstructured(pairs(b), torch_prune.L1Unstructured, amount=0.6)
    assert_same_state(a, b)


def test_a_generator_of_parameters_works():
    a = make_model()
    b = copy.deepcopy(a)
    torch_prune.global_unstructured(pairs(a), torch_prune.L1Unstructured, amount=0.5)
    kf_prune.global_unstructured((p for p in pairs(b)), torch_prune.L1Unstructured, amount=0.5)
    assert_same_state(a, b)


def test_ties_prune_the_last_entries_in_parameter_order():
    lin1, lin2 = nn.Linear(4, 3), nn.Linear(3, 2)
    with torch.no_grad():
        for p in (lin1.weight, lin1.bias, lin2.weight, lin2.bias):
            p.fill_(-0.5)
        lin1.weight[0, 0] = 2.0  # one clear winner
    params = [(lin1, "weight"), (lin1, "bias"), (lin2, "weight"), (lin2, "bias")]
    n = 12 + 3 + 6 + 2
    kf_prune.global_unstructured(params, kf_prune.L1Unstructured, amount=10)
    kept = torch.cat([getattr(m, name + "_mask").reshape(-1) for m, name in params])
    assert kept.tolist() == [1.0] * (n - 10) + [0.0] * 10


def test_zero_scores_at_the_threshold_never_revive_pruned_entries():
    """Iterative pruning where the threshold is 0: entries pruned before also score 0 and come
    first in order, yet only unpruned zero-score entries may be kept (the first ones in order)."""
    lin1, lin2 = nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)
    params = [(lin1, "weight"), (lin2, "weight")]
    with torch.no_grad():
        lin1.weight.copy_(torch.arange(1.0, 13.0).reshape(3, 4))
        lin2.weight.copy_(torch.arange(13.0, 19.0).reshape(2, 3))
    kf_prune.global_unstructured(params, kf_prune.L1Unstructured, amount=4)  # prunes 1, 2, 3, 4 of lin1
    with torch.no_grad():
        lin1.weight_orig[1:].zero_()  # 8 unpruned entries of lin1 now score 0
        lin2.weight_orig[0, 0] = 0.0  # and one of lin2
    lin2(lin1(torch.zeros(1, 4)))  # the forward pre-hooks refresh weight = weight_orig * weight_mask
    # 14 unpruned: 5 positive (lin2), 9 zero; prune 6 -> keep the 5 positive + the first 3 zeros
    kf_prune.global_unstructured(params, kf_prune.L1Unstructured, amount=6)
    assert lin1.weight_mask.reshape(-1).tolist() == [0.0] * 4 + [1.0] * 3 + [0.0] * 5
    assert lin2.weight_mask.reshape(-1).tolist() == [0.0] + [1.0] * 5


def test_nan_scores_raise_naming_the_parameter_and_leave_the_model_alone():
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model[4].bias[3] = float("nan")
    with pytest.raises(ValueError, match=r"expected scores without NaN, got NaN in 'parameters\[5\] \(Linear.bias\)'"):
        kf_prune.global_unstructured(pairs(model), kf_prune.L1Unstructured, amount=0.5)
    assert not kf_prune.is_pruned(model)
    assert list(model.state_dict()) == list(before)


def test_errors_match_torch_types():
    model = make_model()
    fn = "koopfast.prune.global_unstructured"
    for bad, exc in [(-1, ValueError), (1.5, ValueError), ("0.5", TypeError)]:
        with pytest.raises(exc):
            torch_prune.global_unstructured(pairs(model), torch_prune.L1Unstructured, amount=bad)
        with pytest.raises(exc):
            kf_prune.global_unstructured(pairs(model), torch_prune.L1Unstructured, amount=bad)
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=rf"{fn}: expected amount <= {n} \(the number of entries left to prune\)"):
        kf_prune.global_unstructured(pairs(model), torch_prune.L1Unstructured, amount=n + 1)
    with pytest.raises(TypeError, match=rf"{fn}: expected parameters to be an iterable"):
        kf_prune.global_unstructured(3, torch_prune.L1Unstructured, amount=1)
    with pytest.raises(TypeError, match=rf"{fn}: expected importance_scores to be a dict"):
        kf_prune.global_unstructured(pairs(model), torch_prune.L1Unstructured, importance_scores=[], amount=1)
    with pytest.raises(ValueError, match=rf"{fn}: expected at least one \(module, name\) pair, got none"):
        kf_prune.global_unstructured([], torch_prune.L1Unstructured, amount=1)
    lin = model[4]
    with pytest.raises(
        ValueError, match=r"expected the importance scores of parameters\[0\] \(Linear.weight\) to have"
    ):
        kf_prune.global_unstructured(
            [(lin, "weight")], kf_prune.L1Unstructured, importance_scores={(lin, "weight"): torch.ones(5)}, amount=1
        )
    with pytest.raises(TypeError, match=r"expected the importance scores of parameters\[0\] .* real .* got torch.bool"):
        kf_prune.global_unstructured(
            [(lin, "weight")],
            kf_prune.L1Unstructured,
            importance_scores={(lin, "weight"): torch.ones(lin.weight.shape, dtype=torch.bool)},
            amount=1,
        )
    assert not kf_prune.is_pruned(model)


def test_other_methods_run_torch_itself():
    a = make_model()
    b = copy.deepcopy(a)
    torch.manual_seed(5)
    torch_prune.global_unstructured(pairs(a), torch_prune.RandomUnstructured, amount=0.4)
    torch.manual_seed(5)
    kf_prune.global_unstructured(pairs(b), torch_prune.RandomUnstructured, amount=0.4)
    assert_same_state(a, b)
    with pytest.raises(TypeError, match='Only "unstructured" PRUNING_TYPE'):
        kf_prune.global_unstructured(pairs(b), torch_prune.RandomStructured, amount=0.4, dim=0)


# ---- layerwise --------------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0.25, 0.5, 2, 0])
def test_l1_unstructured_equals_torch_also_iteratively(device, amount):
    a = make_model(device)
    b = copy.deepcopy(a)
    for _ in range(2):
        for (ma, name), (mb, _) in zip(pairs(a), pairs(b)):
            torch_prune.l1_unstructured(ma, name, amount=amount)
            assert kf_prune.l1_unstructured(mb, name, amount=amount) is mb
    assert_same_state(a, b)
    assert_same_behaviour(a, b, device)
    hook = next(iter(b[0]._forward_pre_hooks.values()))
    assert isinstance(hook, torch_prune.PruningContainer) and isinstance(hook[-1], torch_prune.L1Unstructured)


@pytest.mark.parametrize(("n", "dim"), [(2, 0), (1, 1), (float("inf"), 0), (float("-inf"), -1), (3, 1)])
def test_ln_structured_equals_torch_also_iteratively(device, n, dim):
    a = make_model(device)
    b = copy.deepcopy(a)
    for amount in (0.3, 1):
        for (ma, name), (mb, _) in zip(pairs(a, with_bias=False), pairs(b, with_bias=False)):
            torch_prune.ln_structured(ma, name, amount=amount, n=n, dim=dim)
            kf_prune.ln_structured(mb, name, amount=amount, n=n, dim=dim)
    assert_same_state(a, b)
    assert_same_behaviour(a, b, device)


def test_layerwise_errors():
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"koopfast.prune.LnStructured: expected a tensor of at least 2 dimensions"):
        kf_prune.ln_structured(lin, "bias", amount=1, n=2, dim=0)
    with pytest.raises(IndexError, match=r"koopfast.prune.LnStructured: expected dim in \[-2, 1\], got 2"):
        kf_prune.ln_structured(lin, "weight", amount=1, n=2, dim=2)
    with pytest.raises(ValueError, match=r"koopfast.prune.L1Unstructured: expected amount <= 12"):
        kf_prune.l1_unstructured(lin, "weight", amount=13)
    assert not kf_prune.is_pruned(lin)  # torch rolls back a failed apply


# ---- scale ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_selection_among_unpruned_entries_past_2_31_elements():
    """The masked (iterative) selection path over views of one storage: 129 * 2^24 > 2^31 elements."""
    from koopfast.prune import _keep_among_unpruned

    base = torch.randperm(1 << 24).float() + 1  # distinct nonzero magnitudes
    copies = 129
    half = torch.arange(1 << 24) % 2 == 0  # an earlier pruning kept the even entries
    scores = [base] * copies
    defaults = [half.float()] + [None] * (copies - 1)
    unpruned = [half] + [None] * (copies - 1)
    names = [f"t{i}" for i in range(copies)]
    keep = copies * 1000 + 3
    masks = _keep_among_unpruned(scores, unpruned, defaults, names, keep, "test")
    assert int(kf.ops.count_masks(masks, [m.numel() for m in masks]).sum()) == keep
    # Expected: value v (1 .. 2^24, at position pos[v]) is unpruned in copies 1.. and, if pos[v]
    # is even, in copy 0; the threshold V is where the running count of unpruned entries reaches keep.
    pos = torch.empty(1 << 24, dtype=torch.long)
    pos[base.long() - 1] = torch.arange(1 << 24)
    top = torch.arange((1 << 24) - 1, (1 << 24) - 3000, -1)  # 0-based values, largest first
    count = torch.cumsum(copies - 1 + (pos[top] % 2 == 0).long(), 0)
    v = int(top[int(torch.searchsorted(count, keep))]) + 1
    above = base > v
    ties_kept = keep - int((copies - 1) * above.sum() + (above & half).sum())
    assert not bool((masks[0] & ~half).any()), "an entry pruned before was kept"
    not_v = base != v
    assert torch.equal(masks[0] & not_v, above & half)
    p = int(pos[v - 1])
    for m in masks[1:]:
        assert torch.equal(m & not_v, above)
    holders = [bool(m[p]) for i, m in enumerate(masks) if i > 0 or bool(half[p])]
    assert holders == [True] * ties_kept + [False] * (len(holders) - ties_kept)  # ties: first in order

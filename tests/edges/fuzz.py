"""The adversarial harness: random valid and invalid calls of koopfast's ops and public API.

Every call must end in one of two ways: a result that is checked (against the pure-PyTorch twin
in koopfast.reference, torch.nn.utils.prune, or the invariant the function documents), or a clear
ValueError/TypeError/IndexError that names the function; and a call that fails must leave
everything it was given, and every object it belongs to, exactly as it was. Inputs: dtypes
(float16/bfloat16/float32/float64, integer, bool, complex), zero-size and many-dimensional shapes,
non-contiguous, expanded and sliced layouts, meta tensors mixed with real ones, NaN/Inf/-0 and
heavy ties, out-of-range integers, corrupted files and state dicts.

Run as a script, in its own process, so that a crash (a signal) is seen as one by whoever started
it; each target's cases go through hypothesis (shrinking a failure to a small example):

    python tests/edges/fuzz.py --examples 200          # the short profile (tests/edges/test_fuzz.py)
    python tests/edges/fuzz.py --examples 1500 --json counts.json   # the long one (docs/robustness.md)

It prints, and with --json writes, the count of calls per target and outcome.
"""

from __future__ import annotations

import argparse
import collections
import copy
import io
import json
import math
import sys
import time

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import koopfast as kf
import koopfast.prune as kf_prune
from koopfast import reference

COUNTS: collections.Counter = collections.Counter()
CLEAR = (ValueError, TypeError, IndexError)
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OTHERS = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]


class Unclear(AssertionError):
    """A call failed with an exception that is not a clear error naming the function."""


def expect_clear(exc: BaseException, names: tuple[str, ...], target: str) -> None:
    if isinstance(exc, CLEAR) and any(n in str(exc) for n in names):
        COUNTS[(target, "clear error")] += 1
        return
    raise Unclear(f"{target}: {type(exc).__name__}: {exc}") from exc


def checked(target: str) -> None:
    COUNTS[(target, "result checked")] += 1


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN equal to NaN, -0 different from +0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_meta or b.is_meta:
        return a.is_meta and b.is_meta
    if a.numel() == 0:
        return True

    def raw(t):
        return t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)

    return torch.equal(raw(a), raw(b))


# ---- strategies --------------------------------------------------------------------------------------


@st.composite
def shapes(draw, max_dims: int = 5):
    if draw(st.integers(0, 30)) == 0:  # now and then many (empty or unit) dimensions
        return tuple(draw(st.sampled_from([0, 1])) for _ in range(draw(st.integers(9, 70))))
    return tuple(draw(st.lists(st.integers(0, 6), max_size=max_dims)))


def _values(draw, shape, dtype) -> torch.Tensor:
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    kind = draw(st.sampled_from(["normal", "ties", "special", "zeros"]))
    if kind == "ties":
        x = torch.randint(-2, 3, (n,), generator=gen).double()
    elif kind == "zeros":
        x = torch.zeros(n, dtype=torch.float64)
    else:
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        if kind == "special" and n:
            specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e30], dtype=torch.float64)
            idx = torch.randint(n, (max(1, n // 4),), generator=gen)
            x[idx] = specials[torch.randint(5, (idx.numel(),), generator=gen)]
    if dtype == torch.bool:
        return (x > 0).reshape(shape)
    if not dtype.is_floating_point and not dtype.is_complex:
        return x.nan_to_num(0, 0, 0).clamp(-100, 100).round().to(dtype).reshape(shape)
    return x.to(dtype).reshape(shape)


def _layout(draw, t: torch.Tensor) -> torch.Tensor:
    kind = draw(st.sampled_from(["contiguous", "contiguous", "transposed", "sliced", "expanded"]))
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)  # same values, permuted strides
    if kind == "sliced" and t.dim() >= 1 and t.shape[0] >= 1:
        wide = torch.cat([t, t], dim=0)
        return wide[::2]  # every other row: strided
    if kind == "expanded" and t.dim() >= 1 and t.shape[0] == 1:
        return t.expand(3, *t.shape[1:])
    return t


@st.composite
def tensors(draw, dtypes=None, shape=None, meta_rate: int | None = 40):
    dtype = draw(st.sampled_from(dtypes or FLOATS + OTHERS[:1]))
    shape = draw(shapes()) if shape is None else shape
    t = _layout(draw, _values(draw, shape, dtype))
    if meta_rate is not None and draw(st.integers(0, meta_rate)) == 0:
        t = t.to("meta")
    return t


ints = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]))


def mostly(data, valid, invalid, odds: int = 4):
    """A draw from ``valid`` ``odds`` times out of ``odds + 1``, else from ``invalid``: most calls
    must get far enough to be checked, the rest attack the checks."""
    return data.draw(valid if data.draw(st.integers(0, odds)) else invalid)


# ---- targets -----------------------------------------------------------------------------------------


def target_select(data) -> None:
    name = "ops.select_threshold/topk_mask"
    a = mostly(data, st.lists(tensors(dtypes=FLOATS), min_size=1, max_size=4), st.lists(tensors(), max_size=4))
    score = mostly(data, st.sampled_from(["value", "abs", "product", "abs_product", "square_times_abs"]),
                   st.sampled_from(["bogus", "ABS"]))  # fmt: skip
    binary = score in ("product", "abs_product", "square_times_abs")
    if mostly(data, st.just(True), st.just(False)):
        b = [data.draw(tensors(dtypes=[t.dtype], shape=tuple(t.shape))) for t in a] if binary else []
    else:
        b = data.draw(st.lists(tensors(), max_size=2))
    n = sum(t.numel() for t in a)
    k = mostly(data, st.integers(1, max(n, 1)), ints)
    before = [t.clone() if not t.is_meta else t for t in a + b]
    try:
        threshold, stats = kf.ops.select_threshold(a, b, score, k)
    except Exception as exc:
        expect_clear(exc, ("koopfast::select_threshold",), name)
        return
    finally:
        assert all(bits_equal(x, y) for x, y in zip(before, a + b)), "select_threshold changed its inputs"
    if threshold.is_meta:
        assert all(t.is_meta for t in a + b), "a meta result for real inputs"
        checked(name)
        return
    want_t, want_s = reference.select_threshold(a, b, score, k)
    if int(stats[3]) >= 0:  # a NaN score: only the tensor holding it is defined
        assert int(stats[3]) == int(want_s[3]), (stats, want_s)
        checked(name)
        return
    assert bits_equal(threshold, want_t) and torch.equal(stats, want_s), (threshold, want_t, stats, want_s)
    masks = kf.ops.topk_mask(a, b, score, threshold, stats)
    want = reference.topk_mask(a, b, score, want_t, want_s)
    assert all(torch.equal(m, w) for m, w in zip(masks, want)) and sum(int(m.sum()) for m in masks) == k
    checked(name)


def target_packing(data) -> None:
    name = "ops.pack/unpack/count_masks"
    masks = mostly(data, st.lists(tensors(dtypes=[torch.bool]), max_size=4),
                   st.lists(tensors(dtypes=[torch.bool, torch.uint8, torch.float32]), max_size=4))  # fmt: skip
    try:
        packed = kf.ops.pack_masks(masks)
    except Exception as exc:
        expect_clear(exc, ("koopfast::pack_masks",), name)
        return
    if any(m.is_meta for m in masks):
        checked(name)
        return
    assert all(torch.equal(p, w) for p, w in zip(packed, reference.pack_masks(masks)))
    numels = [m.numel() for m in masks]
    if data.draw(st.integers(0, 4)) == 0:
        numels = [data.draw(ints) for _ in masks]
    try:
        unpacked = kf.ops.unpack_masks(packed, numels)
        counts = kf.ops.count_masks(packed, numels)
    except Exception as exc:
        expect_clear(exc, ("koopfast::unpack_masks", "koopfast::count_masks"), name)
        return
    assert all(torch.equal(u, w) for u, w in zip(unpacked, reference.unpack_masks(packed, numels)))
    assert torch.equal(counts, reference.count_masks(packed, numels))
    if numels == [m.numel() for m in masks]:
        assert all(torch.equal(u, m.reshape(-1)) for u, m in zip(unpacked, masks))
    checked(name)


def target_apply(data) -> None:
    name = "ops.apply_masks"
    targets = [t.clone() if not t.is_meta else t for t in data.draw(st.lists(tensors(), min_size=1, max_size=3))]
    masks = []
    for t in targets:
        kind = data.draw(st.sampled_from(["bool", "bool", "packed", "packed", "other"]))
        if kind == "bool":
            masks.append(data.draw(tensors(dtypes=[torch.bool], shape=tuple(t.shape))))
        elif kind == "packed" and not t.is_meta:
            bools = data.draw(tensors(dtypes=[torch.bool], shape=tuple(t.shape), meta_rate=None))
            masks.append(kf.ops.pack_masks([bools])[0])
        else:
            masks.append(data.draw(tensors(dtypes=[torch.bool, torch.uint8, torch.float32])))
    same_length = st.lists(ints, min_size=len(targets), max_size=len(targets))
    index = mostly(data, st.just(list(range(len(targets)))), same_length)
    before = [t.clone() if not t.is_meta else t for t in targets]
    expected = [t.clone() if not t.is_meta else t for t in targets]
    try:
        kf.ops.apply_masks(targets, masks, index)
    except Exception as exc:
        assert all(bits_equal(x, y) for x, y in zip(before, targets)), "a failed apply_masks wrote to its targets"
        expect_clear(exc, ("koopfast::apply_masks",), name)
        return
    if not any(t.is_meta for t in targets):
        reference.apply_masks(expected, masks, index)
        assert all(bits_equal(t, e) for t, e in zip(targets, expected))
    checked(name)


def target_codes(data) -> None:
    name = "ops.sign_codes/hamming"
    x = mostly(data, tensors(dtypes=[*FLOATS, torch.bool]), tensors(dtypes=[torch.int64, torch.complex64]))
    dim = mostly(data, st.integers(-max(x.dim(), 1), max(x.dim() - 1, 0)), ints)
    try:
        codes = kf.ops.sign_codes(x, dim)
    except Exception as exc:
        expect_clear(exc, ("koopfast::sign_codes",), name)
        return
    if x.is_meta:
        checked(name)
        return
    assert torch.equal(codes, reference.sign_codes(x, dim))
    other = codes.flip(0) if data.draw(st.booleans()) else codes[:, :0]
    try:
        distances = kf.ops.hamming_distance([codes], [other])
    except Exception as exc:
        expect_clear(exc, ("koopfast::hamming_distance",), name)
        return
    assert torch.equal(distances[0], reference.hamming_distance([codes], [other])[0])
    assert torch.equal(kf.ops.pairwise_hamming(codes), reference.pairwise_hamming(codes))
    checked(name)


def target_global_topk(data) -> None:
    name = "masks.global_topk/layerwise_topk"
    chosen = mostly(data, st.lists(tensors(dtypes=FLOATS), min_size=1, max_size=4), st.lists(tensors(), max_size=4))
    scores = {f"t{i}": t for i, t in enumerate(chosen)}
    by = mostly(data, st.sampled_from(["value", "abs", "abs_product"]), st.just("nope"))
    if by == "abs_product":
        scores = {n: (t, t * 2) if data.draw(st.integers(0, 5)) else t for n, t in scores.items()}
    sparsity = mostly(data, st.floats(0, 0.999), st.sampled_from([1.0, -0.1, float("nan"), True, "0.5"]))
    layerwise = data.draw(st.booleans())
    try:
        masks = (kf.masks.layerwise_topk if layerwise else kf.masks.global_topk)(scores, sparsity, by=by)
    except Exception as exc:
        expect_clear(exc, ("koopfast.masks.global_topk", "koopfast.masks.layerwise_topk"), name)
        return
    values = {n: (v[0] * v[1] if isinstance(v, tuple) else v) for n, v in scores.items()}
    if any(t.is_meta for t in values.values()):
        checked(name)
        return
    s = {n: (t.double().abs() if by != "value" else t.double()) for n, t in values.items()}
    groups = [list(s)] if not layerwise else [[n] for n in s]
    for group in groups:
        n = sum(s[g].numel() for g in group)
        kept = sum(int(masks[g].sum()) for g in group)
        assert kept == round((1 - sparsity) * n), (kept, n, sparsity)
        if 0 < kept < n:
            low = min(float(s[g][masks[g]].min()) for g in group if masks[g].any())
            high = max(float(s[g][~masks[g]].max()) for g in group if (~masks[g]).any())
            assert low >= high, (low, high)
    checked(name)


def target_masks_file(data) -> None:
    name = "masks.save/load"
    count = data.draw(st.integers(0, 3))
    masks = {f"m{i}": data.draw(tensors(dtypes=[torch.bool], meta_rate=None)) for i in range(count)}
    buffer = io.BytesIO()
    kf.masks.save(masks, buffer)
    raw = bytearray(buffer.getvalue())
    damage = data.draw(st.sampled_from(["none", "flip", "truncate", "append", "empty"]))
    if damage == "flip" and raw:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif damage == "truncate":
        raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif damage == "append":
        raw += b"garbage"
    elif damage == "empty":
        raw = bytearray()
    try:
        loaded = kf.masks.load(io.BytesIO(bytes(raw)))
    except Exception as exc:
        expect_clear(exc, ("koopfast.masks.load",), name)
        return
    assert list(loaded) == list(masks) and all(torch.equal(loaded[n], masks[n]) for n in masks), damage
    checked(name)


def recorder_state(rec) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in rec.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and bits_equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def target_recorder(data) -> None:
    name = "TrajectoryRecorder and DMD"
    params = {f"p{i}": data.draw(tensors(dtypes=[torch.float32, torch.float64, torch.float16], meta_rate=None)).clone()
              for i in range(data.draw(st.integers(1, 3)))}  # fmt: skip
    capacity = mostly(data, st.integers(2, 5), ints, odds=8)
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    anchor = mostly(data, st.sampled_from(["auto", "none", "first"]), st.just("last"), odds=8)
    window = data.draw(st.booleans())
    try:
        rec = kf.TrajectoryRecorder(params, capacity, dtype=dtype, anchor=anchor, window=window)
    except Exception as exc:
        expect_clear(exc, ("koopfast.TrajectoryRecorder",), name)
        return
    for _ in range(data.draw(st.integers(1, 7))):
        action = data.draw(st.sampled_from(["record", "record", "record", "poison", "reshape", "load", "load", "fit"]))
        before = recorder_state(rec)
        if action in ("record", "poison", "reshape"):  # what training (or a bug in it) does to the parameters
            victim = data.draw(st.sampled_from(list(params)))
            with torch.no_grad():
                for p in params.values():
                    p.add_(torch.randn(p.shape, dtype=p.dtype) * 0.1)
                if action == "poison" and params[victim].numel():
                    first = (0,) * params[victim].dim()
                    params[victim][first] = data.draw(st.sampled_from([float("nan"), float("inf"), 1e30]))
            if action == "reshape":
                params[victim].data = torch.zeros(params[victim].numel() + 1, dtype=params[victim].dtype)
        elif action == "load":
            state = recorder_state(rec)
            keys = ["snapshots", "row_dots", "steps", "anchor_sq", "anchor", "names", "none", "none"]
            key = data.draw(st.sampled_from(keys))
            if key != "none":
                state[key] = data.draw(
                    st.sampled_from([None, -1, "x", float("nan"), torch.zeros(3), torch.full((1,), float("nan"))])
                )
        try:
            if action in ("record", "poison", "reshape"):
                full = len(rec) == rec.capacity
                rec.record()
                assert len(rec) == min(len(before["snapshots"]) + 1, rec.capacity) and (window or not full)
            elif action == "load":
                rec.load_state_dict(state)
                assert same(recorder_state(rec), state)
            else:
                method = data.draw(st.sampled_from(["gram", "qr", "randomized"]))
                kmd = kf.DMD(method, rank=data.draw(st.one_of(st.integers(1, 4), st.none()))).fit(rec)
                assert torch.isfinite(kmd.eigenvalues).all()
                last = rec.snapshot(-1)
                assert all(torch.equal(kmd.forecast(0)[n], last[n]) for n in last)
        except (Unclear, AssertionError):
            raise
        except Exception as exc:
            assert same(recorder_state(rec), before), f"a failed {action} changed the recorder"
            expect_clear(exc, ("koopfast.TrajectoryRecorder", "koopfast.DMD"), name)
            if action == "reshape":
                return
            continue
        checked(name)


def target_prune(data) -> None:
    name = "prune.global_unstructured vs torch"
    sizes = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    total = sum(sizes)
    values = (torch.randperm(total) + 1).float() * torch.where(torch.rand(total) > 0.5, 1.0, -1.0)  # distinct |v|

    def build():
        mods, start = [], 0
        for s in sizes:
            m = nn.Linear(s, 1, bias=False)
            with torch.no_grad():
                m.weight.copy_(values[start : start + s].view(1, s))
            start += s
            mods.append(m)
        return mods

    amount = data.draw(st.one_of(st.integers(-1, total + 2), st.floats(-0.5, 1.5), st.sampled_from(["x", None])))
    twice = data.draw(st.integers(0, 4)) == 0
    ours, theirs = build(), build()
    pairs_ours = [(m, "weight") for m in ours] + ([(ours[0], "weight")] if twice else [])
    pairs_theirs = [(m, "weight") for m in theirs] + ([(theirs[0], "weight")] if twice else [])
    try:
        torch.nn.utils.prune.global_unstructured(pairs_theirs, torch.nn.utils.prune.L1Unstructured, amount=amount)
        torch_error = None
    except Exception as exc:
        torch_error = exc
    try:
        kf_prune.global_unstructured(pairs_ours, kf_prune.L1Unstructured, amount=amount)
    except Exception as exc:
        assert torch_error is not None, f"koopfast raised where torch did not: {exc!r}"
        assert all(not hasattr(m, "weight_mask") for m in ours), "a failed call pruned some modules"
        if isinstance(exc, CLEAR):
            COUNTS[(name, "clear error, as torch")] += 1
            return
        raise Unclear(f"{name}: {type(exc).__name__}: {exc}") from exc
    assert torch_error is None, f"torch raised {torch_error!r} where koopfast did not"
    if not twice:  # with a pair listed twice, torch's choice among the tied copies is unspecified
        assert all(torch.equal(a.weight_mask, b.weight_mask) for a, b in zip(ours, theirs))
    assert sum(int((m.weight_mask == 0).sum()) for m in ours) == sum(int((m.weight_mask == 0).sum()) for m in theirs)
    checked(name)


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))


def model_state(model: nn.Module, optimizer=None) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    if optimizer is not None:
        tensors += [v.clone() for st_ in optimizer.state.values() for v in st_.values() if isinstance(v, torch.Tensor)]
    return tensors


def target_masked(data) -> None:
    name = "masks.apply_/Masked"
    model = small_model(data.draw(st.integers(0, 3)))
    params = dict(model.named_parameters())
    masks = {}
    for n, p in params.items():
        kind = data.draw(st.sampled_from(["bool", "bool", "packed", "skip", "wrong shape", "float", "unknown"]))
        bools = torch.rand(p.shape, generator=torch.Generator().manual_seed(len(masks))) > 0.5
        if kind == "bool":
            masks[n] = bools
        elif kind == "packed":
            masks[n] = kf.masks.pack({n: bools})[n]
        elif kind == "wrong shape":
            masks[n] = bools.reshape(-1)[:-1] if bools.numel() > 1 else bools.reshape(1, -1)
        elif kind == "float":
            masks[n] = bools.float()
        elif kind == "unknown":
            masks[n + "x"] = bools
    kind = data.draw(st.sampled_from(["sgd", "adam", "none"]))
    optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
    opt = optimizers[kind](model.parameters(), lr=0.1) if kind in optimizers else None
    x, y = torch.randn(4, 5), torch.randint(3, (4,))
    if opt is not None:  # optimizer states exist before pruning
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    before = model_state(model, opt)
    try:
        if data.draw(st.booleans()):
            kf.masks.apply_(model, masks)
            masked = None
        else:
            masked = kf.masks.Masked(model, masks, opt)
    except Exception as exc:
        assert all(bits_equal(a, b) for a, b in zip(before, model_state(model, opt))), "a failed call changed the model"
        expect_clear(exc, ("koopfast.masks.apply_", "koopfast.masks.Masked"), name)
        return
    if masked is not None and opt is not None:
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        masked.remove()
    for n, m in masks.items():
        bools = kf.masks.unpack({n: m})[n] if isinstance(m, kf.masks.PackedMask) else m
        assert bool((params[n][~bools] == 0).all()), n
    checked(name)


def target_structured(data) -> None:
    name = "masks.structured_topk"
    model = small_model(0)
    units = {"0.weight": 6, "2.weight": 3}
    scores = {}
    for n, u in units.items():
        kind = data.draw(st.sampled_from(["ok", "ok", "ok", "length", "nan", "int", "skip"]))
        s = torch.randn(u + (1 if kind == "length" else 0), generator=torch.Generator().manual_seed(u))
        if kind == "nan":
            s[0] = float("nan")
        if kind == "int":
            s = s.long()
        if kind != "skip":
            scores[n] = s
    sparsity = mostly(data, st.floats(0, 0.99), st.sampled_from([1.0, -1.0, "x", None]))
    scope = mostly(data, st.sampled_from(["global", "layerwise"]), st.just("local"))
    try:
        masks = kf.masks.structured_topk(scores, model, sparsity, scope=scope)
    except Exception as exc:
        expect_clear(exc, ("koopfast.masks.structured_topk",), name)
        return
    kept = {n: int(masks[n].reshape(masks[n].shape[0], -1).all(1).sum()) for n in scores}
    if scope == "global":
        assert sum(kept.values()) == round((1 - sparsity) * sum(units[n] for n in scores))
    else:
        assert all(k == round((1 - sparsity) * units[n]) for n, k in kept.items())
    checked(name)


def target_gradient_flow(data) -> None:
    name = "criteria.gradient_flow"
    model = small_model(1)
    before = model_state(model)
    sizes = data.draw(st.lists(st.integers(0, 5), max_size=3))
    gen = torch.Generator().manual_seed(len(sizes))
    batches = [(torch.randn(n, 5, generator=gen), torch.randint(3, (n,), generator=gen)) for n in sizes]
    hvp = mostly(data, st.sampled_from([None, "exact", "finite_difference"]), st.just("lanczos"))
    fd_step = mostly(data, st.sampled_from(["auto", 1e-3]), st.sampled_from([0.0, -1.0, "big", float("nan")]))
    measure = data.draw(st.sampled_from(list(kf.criteria.gradflow.MEASURES)))
    try:
        flow = kf.criteria.gradient_flow(
            model,
            kf.criteria.cross_entropy(),
            batches,
            hvp=hvp,
            fd_step=fd_step,
            fisher=data.draw(st.booleans()),
            eval_mode=data.draw(st.booleans()),
        )
        scores = flow.scores(measure, data.draw(st.sampled_from(["unstructured", "filter"])))
    except Exception as exc:
        assert all(bits_equal(a, b) for a, b in zip(before, model_state(model))), "scoring changed the model"
        expect_clear(exc, ("koopfast.criteria.gradient_flow", "koopfast.criteria.GradientFlow"), name)
        return
    assert all(bits_equal(a, b) for a, b in zip(before, model_state(model))), "scoring changed the model"
    assert all(torch.isfinite(s).all() for s in scores.values()) and flow.samples == sum(sizes)
    checked(name)


def target_small_api(data) -> None:
    name = "magnitude/per_unit/report/pack"
    model = small_model(2)
    source = mostly(data, st.just(model), st.sampled_from([{}, [("a", 1)], "model", {"w": torch.ones(2)}]))
    granularity = mostly(data, st.sampled_from(["unstructured", "filter"]), st.just("channel"))
    p = mostly(data, st.sampled_from([1, 2]), st.sampled_from([0, 3, True, 2.0]))
    reduction = mostly(data, st.sampled_from(["sum", "mean", "l2", "max"]), st.just("median"))
    try:
        scores = kf.criteria.magnitude(source, granularity=granularity, p=p)
        units = kf.criteria.per_unit(kf.criteria.magnitude(source), source, reduction=reduction)
        masks = kf.masks.global_topk(scores, 0.5)
        packed = kf.masks.pack(masks)
        report = kf.masks.report(packed)
    except Exception as exc:
        names = ("koopfast.criteria.magnitude", "koopfast.criteria.per_unit", "koopfast.masks")
        expect_clear(exc, names, name)
        return
    assert report.kept == sum(int(m.sum()) for m in masks.values()) == round(0.5 * report.total)
    assert all(torch.equal(kf.masks.unpack(packed)[n], masks[n]) for n in masks)
    if isinstance(source, nn.Module):
        assert all(u.shape[0] == model.get_parameter(n).shape[0] for n, u in units.items())
    checked(name)


def target_earlybird(data) -> None:
    name = "EarlyBird"
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    bad = [torch.randn(8, 5), torch.randn(0, 4), torch.tensor(1.0), "x", [torch.randn(3, 4), "y"]]
    probe = mostly(data, st.just(torch.randn(8, 4)), st.sampled_from(bad))
    window = mostly(data, st.integers(1, 3), st.sampled_from([0, -1, 1.5, True]))
    try:
        detectors = [
            kf.EarlyBird.spline(model, probe, window=window),
            kf.EarlyBird.mask_distance(model, 0.5, window=window),
        ]
    except Exception as exc:
        expect_clear(exc, ("koopfast.EarlyBird",), name)
        return
    for detector in detectors:
        for _ in range(data.draw(st.integers(1, 4))):
            with torch.no_grad():
                model[0].weight.add_(torch.randn(6, 4) * 0.05)
            history = list(detector.history)
            if data.draw(st.integers(0, 5)) == 0 and hasattr(detector, "probe"):
                detector.probe = torch.randn(8, 7)  # a probe the model rejects: the update must change nothing
            try:
                detector.update()
            except Exception as exc:
                assert detector.history == history, "a failed update changed the detector"
                expect_clear(exc, ("koopfast.EarlyBird",), name)
                return
            assert len(detector.history) == len(history) + 1
    checked(name)


TARGETS = [target_select, target_packing, target_apply, target_codes, target_global_topk, target_masks_file,
           target_recorder, target_prune, target_masked, target_structured, target_gradient_flow, target_small_api,
           target_earlybird]  # fmt: skip


def run(examples: int, seed: int = 0) -> dict:
    for target in TARGETS:
        test = settings(
            max_examples=examples,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )(given(st.data())(target))
        print(f"fuzz: {target.__name__} ({examples} examples)", flush=True)
        test()
    return {f"{t} | {o}": n for (t, o), n in sorted(COUNTS.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="hypothesis examples per target")
    parser.add_argument("--json", help="write the counts to this file")
    args = parser.parse_args()
    start = time.perf_counter()
    counts = run(args.examples)
    total = sum(counts.values())
    print(json.dumps(counts, indent=1))
    print(f"fuzz: {total} calls, no crash, no unclear error, no state changed by a failed call "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"examples_per_target": args.examples, "calls": total, "counts": counts}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

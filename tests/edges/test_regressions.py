"""A regression test for every crash, corruption, silent wrong result and unclear error that the
fuzzing of issue 12 found (each a class closed at its root; tests/edges/test_fuzz.py attacks the
classes at random)."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import koopfast as kf
import koopfast.prune as kf_prune

# ---- crashes ------------------------------------------------------------------------------------------


def test_zero_size_tensors_with_many_dimensions_do_not_crash():
    t = torch.zeros([0] * 70)
    mask = torch.zeros([0] * 70, dtype=torch.bool)
    assert kf.ops.count_masks([mask], [0]).tolist() == [0]
    kf.ops.apply_masks([t], [mask], [0])
    assert kf.ops.pack_masks([mask])[0].numel() == 0
    assert kf.masks.layerwise_topk([t], 0.5)[0].shape == t.shape
    many = torch.randn([2] * 12).permute(*reversed(range(12)))  # 12 strided dimensions: walked through a copy
    assert int(kf.masks.global_topk([many], 0.5)[0].sum()) == many.numel() // 2


def test_a_snapshot_file_truncated_on_disk_raises_instead_of_killing_the_process(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, torch, koopfast as kf
        p = torch.randn(1000)
        rec = kf.TrajectoryRecorder({{"p": p}}, capacity=4, path={str(tmp_path / "s.bin")!r})
        rec.record(); rec.record()
        os.truncate({str(tmp_path / "s.bin")!r}, 100)
        for call in (rec.record, lambda: rec.snapshot(0), lambda: kf.DMD("qr").fit(rec), rec.state_dict):
            try:
                call()
                raise SystemExit("no error")
            except ValueError as exc:
                assert "truncated on disk" in str(exc), exc
        assert len(rec) == 2
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_a_snapshot_file_is_one_recorder_s(tmp_path):
    path = tmp_path / "s.bin"
    first = kf.TrajectoryRecorder({"p": torch.randn(10)}, capacity=2, path=path)
    with pytest.raises(ValueError, match=r"TrajectoryRecorder: expected a snapshot file of its own, .* locked"):
        kf.TrajectoryRecorder({"p": torch.randn(10)}, capacity=2, path=path)
    first.record()
    assert len(first) == 1
    del first
    kf.TrajectoryRecorder({"p": torch.randn(10)}, capacity=2, path=path)  # released with its recorder


# ---- state corrupted by a failed call ------------------------------------------------------------------


def recorder(seed: int, steps: int = 3) -> kf.TrajectoryRecorder:
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(50, generator=gen)
    rec = kf.TrajectoryRecorder({"p": p}, capacity=4)
    for _ in range(steps):
        p.add_(torch.randn(50, generator=gen))
        rec.record()
    return rec


def same_state(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("steps", -1, r"expected steps to be an int >= the 3 snapshots"),
        ("steps", 1, r"expected steps to be an int >= the 3 snapshots"),
        ("steps", "3", r"expected steps to be an int"),
        ("anchor_sq", "x", r"expected anchor_sq to be a finite number"),
        ("anchor_sq", float("nan"), r"expected anchor_sq to be a finite number"),
        ("snapshots", "nan", r"expected finite snapshots, got NaN or Inf"),
        ("row_dots", "other", r"expected row_dots to be the snapshots' Gram matrix"),
        ("anchor", torch.zeros(50), r"expected no anchor \(anchor mode 'none'\)"),
        ("snapshots", "meta", r"expected snapshots to hold values"),
    ],
)
def test_a_rejected_state_changes_nothing(key, value, message):
    a, b = recorder(0), recorder(1)
    before = a.state_dict()
    state = b.state_dict()
    if value == "nan":
        state[key] = state[key].clone()
        state[key][1, 7] = float("nan")
    elif value == "other":
        state[key] = recorder(2).state_dict()[key]
    elif value == "meta":
        state[key] = state[key].to("meta")
    else:
        state[key] = value
    with pytest.raises(ValueError, match=message):
        a.load_state_dict(state)
    assert same_state(a.state_dict(), before) and a.steps == 3


def test_load_state_dict_errors_are_clear():
    rec = recorder(0)
    with pytest.raises(TypeError, match=r"load_state_dict: expected a state dict \(a mapping\), got list"):
        rec.load_state_dict([])
    with pytest.raises(ValueError, match=r"load_state_dict: expected a state from .*, missing \['anchor'"):
        rec.load_state_dict({k: v for k, v in rec.state_dict().items() if k != "anchor"})


def test_global_unstructured_with_a_pair_listed_twice_prunes_as_torch_does():
    def make():
        m = nn.Linear(4, 2)
        with torch.no_grad():
            m.weight.copy_(torch.tensor([[1.0, 2, 3, 4], [-4, -3, -2, -1]]))
        return m

    ours, theirs = make(), make()
    kf_prune.global_unstructured([(ours, "weight")] * 2, pruning_method=kf_prune.L1Unstructured, amount=4)
    torch.nn.utils.prune.global_unstructured(
        [(theirs, "weight")] * 2, pruning_method=torch.nn.utils.prune.L1Unstructured, amount=4
    )
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.weight_mask, theirs.weight_mask)
    assert isinstance(next(iter(ours._forward_pre_hooks.values())), torch.nn.utils.prune.PruningContainer)


# ---- silently wrong results ---------------------------------------------------------------------------


def test_meta_tensors_mixed_with_real_ones_raise():
    cpu, meta = torch.randn(4), torch.empty(4, device="meta")
    with pytest.raises(ValueError, match=r"koopfast::select_threshold: expected every tensor on one device, got cpu"):
        kf.ops.select_threshold([cpu, meta], [], "abs", 1)
    with pytest.raises(ValueError, match=r"koopfast::apply_masks: expected every tensor on one device"):
        kf.ops.apply_masks([cpu], [torch.ones(4, dtype=torch.bool, device="meta")], [0])
    with pytest.raises(ValueError, match=r"global_topk: expected score tensors that hold values, got 'b' on the meta"):
        kf.masks.global_topk({"a": cpu, "b": meta}, 0.5)
    with pytest.raises(ValueError, match=r"TrajectoryRecorder: expected parameters that hold values, got 'm'"):
        kf.TrajectoryRecorder({"m": meta}, capacity=2)
    threshold, stats = kf.ops.select_threshold([meta], [], "abs", 1)  # all meta: shapes only, as tracing needs
    assert threshold.is_meta and stats.shape == (4,)


def test_batches_without_samples_are_skipped_not_turned_into_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(2, (8,))
    loss = kf.criteria.cross_entropy()
    with_empty = kf.criteria.gradient_flow(model, loss, [(x, y), (x[:0], y[:0])], hvp="exact")
    alone = kf.criteria.gradient_flow(model, loss, [(x, y)], hvp="exact")
    assert all(torch.equal(with_empty.grad[n], alone.grad[n]) and torch.equal(with_empty.hg[n], alone.hg[n])
               for n in alone.grad)  # fmt: skip
    assert with_empty.batches == 1 and with_empty.samples == 8
    with pytest.raises(ValueError, match=r"gradient_flow: expected at least one batch with samples, got none"):
        kf.criteria.gradient_flow(model, loss, [(x[:0], y[:0])])


def test_a_flipped_bit_or_duplicate_names_in_a_masks_file_are_detected():
    masks = {"a": torch.rand(5, 3) > 0.5, "b": torch.rand(9) > 0.5}
    buffer = io.BytesIO()
    kf.masks.save(masks, buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    state["bits"][0][0] ^= 1
    damaged = io.BytesIO()
    torch.save(state, damaged)
    damaged.seek(0)
    with pytest.raises(ValueError, match=r"masks.load: the file's checksum does not match its content"):
        kf.masks.load(damaged)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    state["names"][1] = "a"
    twice = io.BytesIO()
    torch.save(state, twice)
    twice.seek(0)
    with pytest.raises(ValueError, match=r"masks.load: expected each mask name once, got \['a'\]"):
        kf.masks.load(twice)


def test_anchor_norms_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(300_001, generator=gen)
    results = []
    try:
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            rec = kf.TrajectoryRecorder({"p": p}, capacity=3, dtype=torch.bfloat16)
            rec.record()
            results.append(rec.state_dict()["anchor_sq"])
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1]


# ---- unclear errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"not a file", "truncated"])
def test_masks_load_names_a_damaged_file(content):
    if content == "truncated":
        buffer = io.BytesIO()
        kf.masks.save({"a": torch.ones(10, dtype=torch.bool)}, buffer)
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    with pytest.raises(ValueError, match=r"masks.load: expected a koopfast masks file, got an empty, truncated"):
        kf.masks.load(io.BytesIO(content))
    with pytest.raises(FileNotFoundError):
        kf.masks.load(os.path.join("no", "such", "file"))


@pytest.mark.parametrize("method", ["gram", "qr", "randomized"])
def test_dmd_of_an_all_zero_trajectory_says_so(method):
    rec = kf.TrajectoryRecorder({"p": torch.zeros(20)}, capacity=4)
    for _ in range(3):
        rec.record()
    with pytest.raises(ValueError, match=r"DMD.fit: expected snapshots that are not all zero"):
        kf.DMD(method, rank=2).fit(rec)


def test_integers_beyond_int64_are_named():
    with pytest.raises(ValueError, match=r"koopfast::select_threshold: expected k within int64 .* 1844674407370955161"):
        kf.ops.select_threshold([torch.randn(3)], [], "abs", 2**64)
    with pytest.raises(TypeError, match=r"koopfast::count_masks: expected numels\[0\] to be an int, got float"):
        kf.ops.count_masks([torch.ones(3, dtype=torch.bool)], [3.0])
    with pytest.raises(ValueError, match=r"global_topk: expected keep in \[0, 3\]"):
        kf.masks.global_topk([torch.randn(3)], keep=2**64)


# ---- koopfast.prune against torch.nn.utils.prune's own behaviour --------------------------------------


def test_pruning_methods_work_on_their_own_as_torch_s_do():
    t = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])
    default = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]])
    for ours, theirs in (
        (kf_prune.L1Unstructured(amount=2), torch.nn.utils.prune.L1Unstructured(amount=2)),
        (kf_prune.LnStructured(amount=1, n=2, dim=0), torch.nn.utils.prune.LnStructured(amount=1, n=2, dim=0)),
    ):
        assert torch.equal(ours.compute_mask(t, default), theirs.compute_mask(t, default))
        assert torch.equal(ours.prune(t, default), theirs.prune(t, default))
        container = torch.nn.utils.prune.PruningContainer()
        container._tensor_name = "test"
        ours._tensor_name = "test"
        container.add_pruning_method(ours)
        assert torch.equal(container.compute_mask(t, default), theirs.compute_mask(t, default))


def test_integer_importance_scores_are_ranked_as_torch_ranks_them():
    t = torch.randperm(70).reshape(10, 7) - 35  # distinct integer magnitudes but 0
    ours = kf_prune.L1Unstructured(amount=0.2).compute_mask(t, torch.ones_like(t))
    theirs = torch.nn.utils.prune.L1Unstructured(amount=0.2).compute_mask(t, torch.ones_like(t))
    ties = t.abs() == t.abs().flatten().kthvalue(14).values  # torch's choice among ties is unspecified
    assert int((ours == 0).sum()) == 14 and torch.equal(ours[~ties], theirs[~ties])
    with pytest.raises(TypeError, match=r"L1Unstructured: expected the importance scores to be a real .* torch.bool"):
        kf_prune.L1Unstructured(amount=1).compute_mask(torch.ones(3, dtype=torch.bool), torch.ones(3))


def test_models_pruned_here_load_where_koopfast_is_not_installed(tmp_path):
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    kf_prune.l1_unstructured(model[0], "weight", amount=0.5)
    kf_prune.ln_structured(model[0], "weight", amount=1, n=2, dim=0)
    kf_prune.global_unstructured([(model[2], "weight")], pruning_method=kf_prune.L1Unstructured, amount=3)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    assert b"koopfast" not in pickle.dumps(model)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["koopfast"] = None  # no koopfast in this process
        import torch
        model = torch.load({str(path)!r}, weights_only=False)
        hook = next(iter(model[0]._forward_pre_hooks.values()))
        print(type(hook).__module__, [type(h).__name__ for h in hook], int((model[0].weight == 0).sum()))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    module, kinds, zeros = result.stdout.split(" ", 2)[0], result.stdout.split("[")[1].split("]")[0], result.stdout
    assert module == "torch.nn.utils.prune" and "'L1Unstructured', 'LnStructured'" in kinds
    assert int(zeros.split()[-1]) == int((model[0].weight == 0).sum())


def test_a_failing_mask_computation_leaves_the_module_unpruned():
    m = nn.Linear(5, 3)

    class Boom(kf_prune.L1Unstructured):
        def compute_mask(self, t, default_mask):
            raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no"):
        Boom.apply(m, "weight", amount=0.5)
    assert "weight" in dict(m.named_parameters()) and not hasattr(m, "weight_mask") and not m._forward_pre_hooks


def test_koopfast_s_own_float_reductions_do_not_depend_on_the_thread_count():
    """The norms behind the anchor and the finite-difference step (docs/robustness.md: PyTorch's
    gradients themselves are another matter)."""
    from koopfast._reduce import sq_norm

    threads = torch.get_num_threads()
    x = torch.randn(3_000_017, generator=torch.Generator().manual_seed(0))
    values = []
    try:
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            values.append(sq_norm(x))
    finally:
        torch.set_num_threads(threads)
    assert values[0] == values[1]
    assert abs(values[0] - float(x.double().square().sum())) <= 1e-12 * values[0]


def test_topk_mask_reads_strided_stats_by_their_strides():
    """topk_mask read the stats' memory as if contiguous: a strided stats view gave wrong tie counts."""
    x = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0])
    threshold, stats = kf.ops.select_threshold([x], [], "value", 2)
    strided = torch.stack([stats, torch.full_like(stats, 99)], dim=1)[:, 0]  # stride 2
    assert not strided.is_contiguous()
    masks = kf.ops.topk_mask([x], [], "value", threshold, strided)
    assert masks[0].tolist() == [True, True, False, False, False]

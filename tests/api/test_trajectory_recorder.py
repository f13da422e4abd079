"""kf.TrajectoryRecorder: Gram bookkeeping, windows, anchors, storage, exact resume, and errors."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import koopfast as kf
from koopfast import reference


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 3))


def step(net, scale=0.01, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device) * scale)


def stored_matrix(rec):
    """[N, t] float64 matrix of the snapshots as stored (anchor + row, exactly), in time order."""
    return torch.cat(list(rec.blocks()), dim=1).T


def flat(net, names):
    params = dict(net.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names]).double().cpu()


def test_records_conv_and_linear_parameters_and_the_gram_matrix(device):
    net = model().to(device)
    rec = kf.TrajectoryRecorder(net, capacity=8)
    assert rec.names == ("0.weight", "0.bias", "3.weight", "3.bias") and rec.numel == 20 * 16 + 16 + 16 * 3 + 3
    snaps = []
    for _ in range(5):
        rec.record()
        snaps.append(
            torch.cat([p.detach().reshape(-1) for p in (net[0].weight, net[0].bias, net[3].weight, net[3].bias)])
        )
        step(net)
    assert len(rec) == 5 and rec.steps == 5
    w = torch.stack(snaps, 1).double().cpu()
    assert torch.equal(stored_matrix(rec).cpu(), w), "float32 snapshots are stored exactly"
    assert torch.allclose(rec.gram, w.T @ w, rtol=1e-13, atol=0)
    assert rec.gram.dtype == torch.float64 and rec.gram.device.type == "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage_uses_deltas_and_keeps_the_full_gram(device, dtype):
    net = model().to(device)
    rec = kf.TrajectoryRecorder(net, capacity=6, dtype=dtype)  # anchor "auto" -> "first"
    first = flat(net, rec.names)
    for _ in range(4):
        rec.record()
        step(net, 1e-3)
    w = stored_matrix(rec).cpu()
    assert torch.allclose(w[:, 0], first, rtol=0, atol=0), "the first snapshot is the anchor itself"
    # Gram of the full snapshots, from the stored deltas, equals the explicit one to float64 rounding
    assert torch.allclose(rec.gram, w.T @ w, rtol=1e-12, atol=0)
    # deltas keep the small differences: much closer to the truth than rounding θ itself
    truth = flat(net, rec.names)
    step(net, 0)
    rec.record()
    delta_err = float((stored_matrix(rec).cpu()[:, -1] - truth).abs().max())
    plain_err = float((truth.to(dtype).double() - truth).abs().max())
    assert delta_err < plain_err / 20


def test_window_keeps_the_last_snapshots(device):
    net = model().to(device)
    rec = kf.TrajectoryRecorder(net, capacity=3, window=True)
    history = []
    for _ in range(7):
        rec.record()
        history.append(flat(net, rec.names))
        step(net)
    assert len(rec) == 3 and rec.steps == 7
    w = torch.stack(history[-3:], 1)
    assert torch.equal(stored_matrix(rec).cpu(), w)
    assert torch.allclose(rec.gram, w.T @ w, rtol=1e-13, atol=0)


def test_full_recorder_without_window_raises_and_keeps_its_state():
    net = model()
    rec = kf.TrajectoryRecorder(net, capacity=2)
    rec.record()
    rec.record()
    before = rec.gram.clone()
    with pytest.raises(ValueError, match=r"record: the recorder is full \(2 snapshots\); create it with window=True"):
        rec.record()
    assert len(rec) == 2 and torch.equal(rec.gram, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_storage_equals_memory_storage(tmp_path, dtype):
    net = model()
    path = tmp_path / "trajectory-{rank}.bin"
    (tmp_path / "trajectory-0.bin").write_bytes(b"stale bytes from an earlier run" * 100)
    on_disk = kf.TrajectoryRecorder(net, capacity=4, window=True, dtype=dtype, path=path)
    in_memory = kf.TrajectoryRecorder(net, capacity=4, window=True, dtype=dtype)
    assert on_disk.path == str(tmp_path / "trajectory-0.bin")
    rows, size = 5, torch.finfo(dtype).bits // 8
    assert (tmp_path / "trajectory-0.bin").stat().st_size == rows * on_disk.numel * size
    for i in range(7):
        on_disk.record()
        in_memory.record()
        step(net, seed=i)
    assert torch.equal(on_disk.gram, in_memory.gram)
    assert torch.equal(stored_matrix(on_disk), stored_matrix(in_memory))
    for method in ("gram", "qr"):
        a, b = kf.DMD(method).fit(on_disk), kf.DMD(method).fit(in_memory)
        assert torch.equal(a.eigenvalues, b.eigenvalues)
        for name, t in a.fixed_point().items():
            assert torch.equal(t, b.fixed_point()[name])
    # The file holds the snapshots: another mapping of it holds the latest row (bf16: a delta).
    mapped = torch.from_file(on_disk.path, shared=False, size=rows * on_disk.numel, dtype=dtype).view(rows, -1)
    anchor = on_disk.state_dict()["anchor"]
    latest = stored_matrix(on_disk)[:, -1] - (0 if anchor is None else anchor.double())
    assert any(torch.equal(row.double(), latest) for row in mapped)


def test_disk_storage_needs_a_cpu_buffer():
    message = r"TrajectoryRecorder: expected the buffer on the CPU \(device='cpu'\) with path"
    with pytest.raises(ValueError, match=message):
        kf.TrajectoryRecorder(model(), capacity=2, device="meta", path="x.bin")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs parameters on a GPU")
def test_host_storage_for_parameters_on_a_gpu():
    net = model().cuda()
    rec = kf.TrajectoryRecorder(net, capacity=4, device="cpu")
    ref = kf.TrajectoryRecorder(net, capacity=4)
    for _ in range(3):
        rec.record()
        ref.record()
        step(net)
    assert rec.device.type == "cpu" and next(rec.blocks()).device.type == "cpu"
    assert torch.equal(stored_matrix(rec), stored_matrix(ref).cpu())
    assert torch.allclose(rec.gram, ref.gram, rtol=1e-12, atol=0)


def test_explicit_anchor(device):
    net = model().to(device)
    init = {
        n: p.detach().clone() for n, p in net.named_parameters() if n in ("0.weight", "0.bias", "3.weight", "3.bias")
    }
    rec = kf.TrajectoryRecorder(net, capacity=4, dtype=torch.bfloat16, anchor=init)
    step(net)
    rec.record()
    w = stored_matrix(rec).cpu()
    assert torch.allclose(rec.gram, w.T @ w, rtol=1e-12, atol=0)


def test_state_dict_round_trip_resumes_bit_identically():
    net = model()
    rec = kf.TrajectoryRecorder(net, capacity=5, dtype=torch.bfloat16, window=True)
    for i in range(4):
        rec.record()
        step(net, seed=i)
    buffer = io.BytesIO()
    torch.save(rec.state_dict(), buffer)
    saved_net = {k: v.clone() for k, v in net.state_dict().items()}
    for i in range(4, 8):  # the uninterrupted run
        rec.record()
        step(net, seed=i)
    # "crash": a new process rebuilds the model and the recorder and loads both states
    net2 = model(seed=123)
    net2.load_state_dict(saved_net)
    rec2 = kf.TrajectoryRecorder(net2, capacity=5, dtype=torch.bfloat16, window=True)
    buffer.seek(0)
    rec2.load_state_dict(torch.load(buffer))
    for i in range(4, 8):
        rec2.record()
        step(net2, seed=i)
    assert rec2.steps == rec.steps == 8 and len(rec2) == len(rec) == 5
    assert torch.equal(stored_matrix(rec2), stored_matrix(rec))
    assert torch.equal(rec2.gram, rec.gram)
    assert torch.equal(rec2.state_dict()["anchor"], rec.state_dict()["anchor"])
    for key, value in rec.state_dict().items():
        other = rec2.state_dict()[key]
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, key


def test_load_state_dict_rejects_a_different_recorder():
    rec = kf.TrajectoryRecorder(model(), capacity=4)
    rec.record()
    state = rec.state_dict()
    other = kf.TrajectoryRecorder(model(), capacity=5)
    with pytest.raises(ValueError, match=r"load_state_dict: expected capacity 5 \(as this recorder was built\), got 4"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"expected a state of version 1"):
        other.load_state_dict({**state, "version": 99})
    bad = {**state, "snapshots": state["snapshots"][:, :5]}
    with pytest.raises(ValueError, match=r"expected snapshots of shape \(1, 387\)"):
        rec.load_state_dict(bad)
    assert len(rec) == 1  # untouched by the failed load


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_parameters_raise_and_change_nothing(device, value):
    net = model().to(device)
    rec = kf.TrajectoryRecorder(net, capacity=4, window=True)
    for _ in range(4):
        rec.record()
        step(net)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in rec.state_dict().items()}
    with torch.no_grad():
        net[3].bias[1] = value
    with pytest.raises(
        ValueError, match=r"record: expected finite parameters, got NaN/Inf .* in '3.bias'; nothing was recorded"
    ):
        rec.record()
    after = rec.state_dict()
    for k, v in state.items():
        assert torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v, k


def test_changed_parameters_raise():
    net = model()
    rec = kf.TrajectoryRecorder(net, capacity=4)
    rec.record()
    net[0].bias.data = torch.zeros(17)
    with pytest.raises(ValueError, match=r"record: parameter '0.bias' changed shape from \(16,\) to \(17,\)"):
        rec.record()
    net[0].bias.data = torch.zeros(16, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"record: parameter '0.bias' changed dtype from torch.float32 to torch.float64"
    ):
        rec.record()
    net[0].bias.data = torch.zeros(16)
    net.to_empty(device="meta")  # new parameter objects, elsewhere
    with pytest.raises(ValueError, match=r"record: parameter '0.weight' moved from cpu to meta"):
        rec.record()
    assert len(rec) == 1


def test_replaced_parameter_objects_are_followed():
    net = model()
    rec = kf.TrajectoryRecorder(net, capacity=4)
    rec.record()
    net[0].weight = nn.Parameter(torch.full_like(net[0].weight, 3.0))
    rec.record()
    assert bool((rec.snapshot(-1)["0.weight"] == 3.0).all())


def test_constructor_errors():
    net = model()
    with pytest.raises(ValueError, match=r"TrajectoryRecorder: expected capacity >= 2"):
        kf.TrajectoryRecorder(net, capacity=1)
    with pytest.raises(TypeError, match=r"TrajectoryRecorder: expected capacity to be an int, got float"):
        kf.TrajectoryRecorder(net, capacity=4.0)
    with pytest.raises(TypeError, match=r"expected dtype to be float32, bfloat16 or float16, got torch.float64"):
        kf.TrajectoryRecorder(net, capacity=4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expected anchor 'auto', 'none', 'first' or a dict of tensors, got 'last'"):
        kf.TrajectoryRecorder(net, capacity=4, anchor="last")
    with pytest.raises(ValueError, match=r"expected a model with linear, convolutional or attention layers"):
        kf.TrajectoryRecorder(nn.ReLU(), capacity=4)
    with pytest.raises(TypeError, match=r"expected floating-point parameters, got 'i' of dtype torch.int64"):
        kf.TrajectoryRecorder({"i": torch.ones(3, dtype=torch.long)}, capacity=4)
    with pytest.raises(IndexError, match=r"snapshot: expected t in \[0, 0\), got 0"):
        kf.TrajectoryRecorder(net, capacity=4).snapshot(0)


def test_reference_stored_values_match_the_kernel():
    params = [torch.randn(10), torch.randn(3, 3)]
    snaps = torch.zeros(2, 19, dtype=torch.bfloat16)
    kf.ops.trajectory_ingest(params, snaps, 0, [], None)
    assert torch.equal(snaps[0], reference.stored_values(params, torch.bfloat16, None))


def test_a_parameter_replaced_in_the_model_is_recorded_from_then_on():
    net = model()
    rec = kf.TrajectoryRecorder(net, capacity=4)
    rec.record()
    fresh = torch.nn.Parameter(torch.full_like(net[0].weight, 3.0))
    net[0].weight = fresh  # as load_state_dict(assign=True) does
    rec.record()
    assert torch.equal(rec.snapshot(-1)["0.weight"], fresh.detach())
    net[0] = torch.nn.Linear(net[0].in_features, net[0].out_features + 1)  # a layer of another shape
    with pytest.raises(ValueError, match=r"record: parameter '0.weight' changed shape"):
        rec.record()
    assert len(rec) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_snapshot_store_combine_and_dots_in_time_order(dtype):
    """The store's public interface (what DMD and the Koopman criteria use): combinations and
    inner products of the stored snapshots in time order, across a wrapped ring and an anchor."""
    net = model()
    rec = kf.TrajectoryRecorder(net, capacity=3, window=True, dtype=dtype)
    for i in range(5):  # the ring wraps: slot order is not time order
        rec.record()
        step(net, seed=i)
    w = stored_matrix(rec)  # [N, 3] float64, time order
    coeffs = torch.tensor([[1.0, 0.5], [0.0, -2.0], [3.0, 0.25]], dtype=torch.float64)
    assert torch.allclose(rec.combine(coeffs, wide=True), (w @ coeffs).T, rtol=1e-12, atol=1e-12)
    assert rec.combine(coeffs).dtype == torch.float32
    complex_coeffs = coeffs.to(torch.complex128) * (1 + 1j)
    assert torch.allclose(rec.combine(complex_coeffs, wide=True), (w.to(torch.complex128) @ complex_coeffs).T)
    vectors = torch.randn(2, rec.numel, dtype=torch.float64)
    assert torch.allclose(rec.dots(vectors), w.T @ vectors.T, rtol=1e-12, atol=1e-12)
    assert rec.storage_epsilon >= torch.finfo(torch.float32).eps
    with pytest.raises(ValueError, match=r"TrajectoryRecorder.combine: expected coeffs of shape \[3, m\]"):
        rec.combine(torch.ones(4, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"TrajectoryRecorder.combine: expected float64 or complex128 coeffs"):
        rec.combine(torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"TrajectoryRecorder.dots: expected vectors of shape \[m, 387\]"):
        rec.dots(torch.ones(2, 5))

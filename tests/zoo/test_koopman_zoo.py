"""Recorder, every DMD method, KMP/KGP, fixed point and forecast on the model zoo."""

from __future__ import annotations

import pytest
import torch

import koopfast as kf

from zoo import ALL, CASES


def trained_with_recorder(case, steps=10, capacity=8):
    model = CASES[case].model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rec = kf.TrajectoryRecorder(model, capacity=capacity, window=True)
    for batch in CASES[case].batches(steps):
        loss = CASES[case].loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.record()
    return model.eval(), rec


@pytest.mark.parametrize("case", ALL)
def test_recorder_dmd_and_koopman_criteria(case):
    model, rec = trained_with_recorder(case)
    entries = kf.prunable.prunable(model)
    assert rec.names == tuple(entries) and len(rec) == 8 and rec.steps == 10
    assert rec.numel == sum(e.tensor.numel() for e in entries.values())
    last = rec.snapshot(-1)
    for name, e in entries.items():
        assert torch.equal(last[name], e.tensor.detach()), name  # float32 storage: exact
    fits = {m: kf.DMD(m, rank=5 if m == "randomized" else None).fit(rec) for m in ("gram", "qr", "randomized")}
    # One exact DMD: the Gram and QR factors of the same snapshots give the same spectrum.
    eig = {m: sorted(abs(complex(x)) for x in f.eigenvalues.tolist()) for m, f in fits.items()}
    assert len(eig["gram"]) == len(eig["qr"])
    assert max(abs(a - b) for a, b in zip(eig["gram"], eig["qr"])) < 1e-3
    for method, kmd in fits.items():
        kmp = kf.criteria.koopman_magnitude(kmd)
        kgp = kf.criteria.koopman_gradient(kmd)
        theta_star = kmd.fixed_point()
        ahead = kmd.forecast(3)
        for scores in (kmp, kgp, theta_star, ahead):
            assert list(scores) == list(entries)
            for n, e in entries.items():
                assert scores[n].shape == e.tensor.shape and torch.isfinite(scores[n]).all(), (method, n)
        assert all(torch.equal(kmd.forecast(0)[n], last[n]) for n in entries), method
        assert float(kmp.info["distance"][0]) < 0.5
        masks = kf.masks.global_topk(kmp, sparsity=0.5)
        assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * rec.numel)
    same = [kf.masks.global_topk(kf.criteria.koopman_magnitude(fits[m]), 0.5) for m in ("gram", "qr")]
    overlap = sum(int((a & b).sum()) for a, b in zip(same[0].values(), same[1].values())) / (0.5 * rec.numel)
    assert overlap > 0.99
    kf.masks.apply_(model, masks)
    with pytest.raises(ValueError, match=r"TrajectoryRecorder.record: expected finite parameters, got NaN/Inf"):
        next(iter(entries.values())).tensor.data[0].fill_(float("nan"))
        rec.record()
    assert len(rec) == 8 and rec.steps == 10  # the failed record() changed nothing


@pytest.mark.parametrize("case", ["gpt2", "vit"])
def test_recorder_state_round_trip_resumes_exactly(case):
    model, rec = trained_with_recorder(case, steps=5, capacity=6)
    state = rec.state_dict()
    again = kf.TrajectoryRecorder(model, capacity=6, window=True)
    again.load_state_dict(state)
    assert torch.equal(again.gram, rec.gram)
    rec.record()
    again.record()
    assert torch.equal(again.gram, rec.gram)

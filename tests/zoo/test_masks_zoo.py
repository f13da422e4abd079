"""magnitude -> global_topk -> Masked training with AdamW, save/load and reports, on the model zoo."""

from __future__ import annotations

import io

import pytest
import torch

import koopfast as kf

from zoo import ALL, CASES


@pytest.mark.parametrize("case", ALL)
def test_magnitude_masks_survive_adamw_fine_tuning(case):
    model = CASES[case].model()
    model.train()
    scores = kf.criteria.magnitude(model)
    masks = kf.masks.global_topk(scores, sparsity=0.6)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.4 * total)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with kf.masks.Masked(model, masks, opt):
        for batch in CASES[case].batches(3):
            loss = CASES[case].loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for name, mask in masks.items():
        p = model.get_parameter(name)
        assert bool((p[~mask] == 0).all()), name
        assert bool((opt.state[p]["exp_avg"][~mask] == 0).all()), name
    report = kf.masks.report(model)
    assert [r.name for r in report.layers] == list(masks)
    assert report.kept <= round(0.4 * total)  # kept weights may also have become exactly 0
    buffer = io.BytesIO()
    kf.masks.save(masks, buffer)
    buffer.seek(0)
    loaded = kf.masks.load(buffer)
    assert list(loaded) == list(masks) and all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert kf.masks.report(loaded).sparsity == pytest.approx(0.6, abs=1 / total)

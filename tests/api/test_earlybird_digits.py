"""The early-bird example on real data (scikit-learn's digits), shortened: the detectors fire
during training, after their windows fill, on a model that has learned, and the spline ticket
drawn there trains back to the dense accuracy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import koopfast as kf

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "earlybird_digits.py"


@pytest.fixture
def one_thread():
    """A model this small gains nothing from threads, and on a busy machine a thread team waiting
    for a descheduled member makes every small op slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("earlybird_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.EPOCHS = 12  # the learning rate drops at epochs 6 and 9
    return module


def test_detectors_fire_on_a_real_training_run(example, one_thread):
    torch.manual_seed(0)
    data = example.digits()
    x, y, xt, yt = data
    probe = example.canvas(xt[0], xt[1])
    model = example.make_model()
    opt = example.optimizer(model)
    spline = kf.EarlyBird.spline(model, probe)
    masks = kf.EarlyBird.mask_distance(model, example.PRUNE)
    spline_eb = kf.EarlyBird.spline(model, probe, preset="spline_eb")
    accuracies, snapshot = [], None
    for epoch in range(example.EPOCHS):
        example.train_epoch(model, opt, x, y, epoch)
        if spline.update() and snapshot is None:
            snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        masks.update()
        spline_eb.update()
        accuracies.append(example.accuracy(model, xt, yt))
    assert spline.epoch is not None and spline.window <= spline.epoch < example.EPOCHS
    assert masks.epoch is not None and masks.window <= masks.epoch < example.EPOCHS
    distances = [h for h in spline.history if h is not None]
    assert all(0.0 <= d <= 1.0 for d in distances)
    assert distances[-1] < distances[0]  # the partition settles as training goes on
    assert accuracies[spline.epoch] > 0.9 and accuracies[-1] > 0.95
    # Spline-EB's float32 arithmetic: within (L + 2) * 2**-24 relative (L = 2 BatchNorms), same epoch
    pairs = [(a, b) for a, b in zip(spline_eb.history, spline.history, strict=True) if b is not None]
    assert all(abs(a - b) <= 4 * 2.0**-24 * b for a, b in pairs) and spline_eb.epoch == spline.epoch

    ticket_model = example.make_model()
    ticket_model.load_state_dict(snapshot)
    keep = example.spline_ticket(ticket_model, probe)
    assert sum(int(m.sum()) for _, m in keep.values()) == round((1 - example.PRUNE) * (128 + 64))
    pruned_acc, final_acc = example.train_ticket(ticket_model, keep, spline.epoch + 1, data)
    assert pruned_acc > 0.3  # far above chance (0.1) before any retraining
    assert final_acc > accuracies[-1] - 0.03

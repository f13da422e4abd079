"""ScoreMap: the information behind scores survives ordinary use (copy, pickle, derivation)."""

import copy
import io
import pickle

import pytest
import torch

import koopfast as kf
from koopfast.criteria import KoopmanScores, SplineScores


def _koopman():
    return KoopmanScores({"w": torch.arange(4.0)}, criterion="koopman_magnitude", info={"modes": [2]})


def test_a_dict_in_use_whose_fields_stay():
    s = _koopman()
    assert list(s) == ["w"] and len(s) == 1 and torch.equal(s["w"], torch.arange(4.0))
    s["v"] = torch.zeros(1)
    s.pop("w")
    assert list(s) == ["v"] and s.info == {"modes": [2]} and s.criterion == "koopman_magnitude"
    with pytest.raises(TypeError, match="ScoreMap"):
        kf.ScoreMap({"w": [1.0, 2.0]})
    with pytest.raises(TypeError, match="ScoreMap"):
        s["x"] = [1.0]  # type: ignore[assignment]
    assert list(s) == ["v"]


@pytest.mark.parametrize(
    "derive",
    [
        copy.copy,
        copy.deepcopy,
        lambda s: pickle.loads(pickle.dumps(s)),
        lambda s: _torch_round_trip(s),
        lambda s: s.replace({"w": s["w"] * 2}),
        lambda s: s.only(["w"]),
        lambda s: s.to(torch.float64),
        lambda s: s.map(torch.neg),
    ],
    ids=["copy", "deepcopy", "pickle", "torch.save", "replace", "only", "to", "map"],
)
def test_fields_survive(derive):
    s = _koopman()
    out = derive(s)
    assert type(out) is KoopmanScores and out.criterion == "koopman_magnitude" and out.info == {"modes": [2]}
    assert list(out) == ["w"]
    assert torch.equal(s["w"], torch.arange(4.0))  # the original is untouched


def _torch_round_trip(s):
    buf = io.BytesIO()
    torch.save(s, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_derived_scores_do_not_share_the_mapping():
    s = _koopman()
    t = s.replace({"v": torch.ones(2)})
    assert list(s) == ["w"] and list(t) == ["v"]


def test_only_names_the_missing_scores():
    with pytest.raises(KeyError, match="no scores named"):
        _koopman().only(["w", "nope"])


def test_spline_scores_keep_their_fields_through_a_copy():
    s = SplineScores({"w": torch.zeros(3)}, measure="hamming", policy="global", skipped={"fc": "classifier"})
    t = copy.copy(s)
    assert (t.measure, t.policy, t.skipped) == ("hamming", "global", {"fc": "classifier"})
    assert t.criterion == "spline_redundancy"


def test_criteria_return_score_maps():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    s = kf.criteria.magnitude(model)
    assert isinstance(s, kf.ScoreMap) and s.criterion == "magnitude"
    masks = kf.masks.global_topk(s, 0.5)
    assert set(masks) == set(s)

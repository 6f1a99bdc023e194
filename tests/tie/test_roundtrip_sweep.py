"""Round trips of what TIE saves: the refresher's saved predictors."""

from __future__ import annotations

import pytest

from hf_ext.generation.tie.config import PredictorConfig
from hf_ext.generation.tie.lengthlog import LengthLog
from hf_ext.generation.tie.predictor import LengthPredictor
from hf_ext.generation.tie.refresh import PredictorRefresher


@pytest.fixture(autouse=True)
def _restore_context():
    from hf_ext.generation.tie.cb import preserved_context

    with preserved_context():
        yield


def _accepting_refresher(save_dir) -> PredictorRefresher:
    log = LengthLog()
    for i in range(40):
        log.add(
            prompt=f"question {i}",
            output_len=5 + i,
            reason="eos",
            max_new_tokens=100,
            prompt_tokens=2,
            request_id=f"r{i}",
        )
    ref = PredictorRefresher(
        log,
        None,
        every=10,
        min_records=20,
        config=PredictorConfig.tiny(epochs=1),
        save_dir=save_dir,
        install=lambda p: None,
        isolate=False,
        in_flight=None,
    )
    ref._train = lambda cand, data: (cand, 0.0)  # no training: only the saving is under test
    scores = iter([0.0, 10.0] * 4)  # the new predictor wins every comparison
    ref._score = lambda rows, laws: {
        "nll": next(scores),
        "above_q0.9": 0.0,
        "below_q0.9": 0.0,
        "spearman_uncensored": 0.0,
    }
    return ref


@pytest.mark.filterwarnings("ignore:LengthPredictor.predict called on an untrained predictor")
def test_a_restarted_refresher_does_not_overwrite_the_predictors_saved_before(tmp_path):
    save_dir = tmp_path / "preds"
    first = _accepting_refresher(save_dir)
    assert first.refit()["saved_to"] == str(save_dir / "v1")
    assert first.refit()["saved_to"] == str(save_dir / "v2")
    before = (save_dir / "v1" / "model.safetensors").read_bytes()
    # the server restarts with the same --tie-refit-dir (serving --tie-predictor preds/v2)
    again = _accepting_refresher(save_dir)
    rep = again.refit()
    assert rep["version"] == again.version == 1  # installs of this process, as before
    assert rep["saved_to"] == str(save_dir / "v3")  # the newest predictor has the highest number
    assert (save_dir / "v1" / "model.safetensors").read_bytes() == before
    assert LengthPredictor.from_pretrained(rep["saved_to"]).fitted is False

"""The benchmark LM's training resumes from its checkpoint exactly: two sittings give the
weights one sitting gives (so a run too long for one sitting can be spread over several)."""
import pytest
import torch

from benchmarks import quant_lm

TINY = {**quant_lm.QUICK_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
RECIPE = {**quant_lm.QUICK_RECIPE, "eval_every": 3, "max_steps": 6, "max_seconds": None, "flat_rel": 0.0,
          "warmup": 2, "batch": 2, "seq": 16, "eval_windows": 2}


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(quant_lm, "QUICK_CONFIG", TINY)


def _train(cache, monkeypatch, **kw):
    monkeypatch.setattr(quant_lm, "CACHE", cache)
    return quant_lm.trained(quick=True, recipe=RECIPE, verbose=False, **kw)


def test_two_sittings_equal_one(tmp_path, monkeypatch, tiny):
    one, rec_one = _train(tmp_path / "one", monkeypatch)
    with pytest.raises(quant_lm.NotTrainedYet, match="resume"):
        _train(tmp_path / "two", monkeypatch, session_seconds=0.0)
    assert (tmp_path / "two" / f"quant_lm_{rec_one['key']}.ckpt.pt").exists()
    two, rec_two = _train(tmp_path / "two", monkeypatch)
    assert rec_two["steps"] == rec_one["steps"] > RECIPE["max_steps"]      # cool-down steps after max_steps
    assert [c["held_out_loss"] for c in rec_two["curve"]] == [c["held_out_loss"] for c in rec_one["curve"]]
    for a, b in zip(one.state_dict().values(), two.state_dict().values()):
        assert torch.equal(a, b)
    # finished: the checkpoint is gone and the weights load from the cache
    assert not (tmp_path / "two" / f"quant_lm_{rec_one['key']}.ckpt.pt").exists()
    assert _train(tmp_path / "two", monkeypatch)[1]["cached"]

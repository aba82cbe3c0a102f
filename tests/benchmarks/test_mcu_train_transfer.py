"""benchmarks/mcu_train_transfer.py's data preparation, BN folding and pretraining cache."""
import numpy as np
import torch
from torch import nn

from benchmarks import mcu_train_transfer as T


def test_digits_splits_hold_out_the_fine_tuning_test_images():
    d = T.digits(16)
    assert d["pre_x_train"].shape[1:] == (3, 16, 16) and d["ft_x_test"].shape[1:] == (3, 16, 16)
    assert set(np.unique(d["pre_y_train"])) == set(range(6)) and set(np.unique(d["ft_y_test"])) == set(range(4))
    assert len(d["pre_y_train"]) + len(d["pre_y_test"]) + len(d["ft_y_train"]) + len(d["ft_y_test"]) == 1797
    train = {x.tobytes() for x in d["ft_x_train"]}
    assert not any(x.tobytes() in train for x in d["ft_x_test"])      # test images never trained on
    allx = np.concatenate([d[k] for k in d if "_x_" in k])
    assert abs(allx.mean()) < 1e-3 and abs(allx.std() - 1) < 1e-3
    xs, ys = T.order(d, 2 * len(d["ft_y_train"]) + 3, seed=1)
    assert len(xs) == len(ys) == 2 * len(d["ft_y_train"]) + 3
    assert not np.array_equal(ys, T.order(d, len(ys), seed=0)[1])


def test_fold_bn_keeps_the_function_and_names_what_the_step_trains():
    """The folded torch model computes what the eval model does, and has a tensor for every
    parameter gradrewrite's fold-bn + training step names (what --save-weights writes)."""
    from gradrewrite.compiler import run_pipeline
    from gradrewrite.rewrite.capture import capture
    from gradrewrite.rewrite.train_step import capture_train_step

    torch.manual_seed(0)
    model = T.MCUNetLike(4).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    model.eval()
    folded = T.fold_bn(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    g = capture(model, (x[:1],))
    run_pipeline(g, "fold-bn", verify=False)
    step = capture_train_step(g, "cross_entropy", (x[:1], torch.tensor([1])), lr=0.01)
    paths = set(step.meta["train_step"]["params"])
    assert paths and paths <= set(folded.state_dict()), sorted(paths - set(folded.state_dict()))[:5]


def test_pretrained_is_cached_by_data(tmp_path, monkeypatch):
    calls = []

    def fast(name, data, epochs=1):
        calls.append(name)
        torch.manual_seed(len(calls))
        return T.make_model(name, len(T.PRETRAIN_CLASSES)).eval()

    monkeypatch.setattr(T, "pretrain_fresh", fast)
    d = T.digits(16)
    m1, cached1 = T.pretrained("MCUNet-like", d, cache=tmp_path)
    m2, cached2 = T.pretrained("MCUNet-like", d, cache=tmp_path)
    assert (cached1, cached2) == (False, True) and calls == ["MCUNet-like"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    d2 = dict(d, pre_y_train=d["pre_y_train"][::-1].copy())
    assert not T.pretrained("MCUNet-like", d2, cache=tmp_path)[1]   # other data: trained again
    assert len(list(tmp_path.glob("*.pt"))) == 2

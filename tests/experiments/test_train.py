"""bnlab.experiments.train: seeded runs repeat; evaluation restores the mode; the step loop."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bnlab.config import seed_everything
from bnlab.experiments import data, models, train
from bnlab.experiments.data import TensorLoader
from bnlab.experiments.train import History, evaluate
from bnlab.nn import modules


def tiny_data(n_train: int = 64, n_test: int = 32, batch_size: int = 16) -> data.Data:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_train + n_test, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return data.Data(
        train=data.TensorLoader(x[:n_train], y[:n_train], batch_size, shuffle=True),
        test=data.TensorLoader(x[n_train:], y[n_train:], batch_size),
        classes=data.CLASSES,
    )


def run(bn, seed: int = 0, **kwargs) -> tuple[train.History, nn.Module]:
    seed_everything(seed)
    model = models.lenet(bn=bn)
    history = train.fit(model, tiny_data(), epochs=2, lr=0.5, seed=seed, progress=False, **kwargs)
    return history, model


@pytest.mark.parametrize("bn", [None, "torch", "bnlab"])
def test_seeded_run_is_deterministic(bn):
    (h1, m1), (h2, m2) = run(bn), run(bn)
    for key in ("train_loss", "train_acc", "test_acc"):
        assert getattr(h1, key) == getattr(h2, key), key
    for p1, p2 in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(p1, p2)
    h3, _ = run(bn, seed=1)
    assert h3.train_loss != h1.train_loss  # the seed matters


def test_history_has_one_entry_per_epoch_and_training_changes_the_model():
    seed_everything(0)
    model = models.lenet(bn="torch")
    before = [p.detach().clone() for p in model.parameters()]
    h = train.fit(model, tiny_data(), epochs=3, lr=0.1, progress=False)
    per_epoch = ("train_loss", "train_acc", "test_acc", "seconds")
    assert all(len(getattr(h, key)) == 3 for key in per_epoch)
    assert h.val_acc == [] and h.curve_steps == [] and h.steps == 3 * 4  # 64 images, batch 16
    assert all(s > 0 for s in h.seconds) and all(0 <= a <= 1 for a in h.test_acc)
    assert h.final_test_acc == h.test_acc[-1]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert model.training


def with_val(d: data.Data, n_val: int = 32) -> data.Data:
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(n_val, 1, 28, 28, generator=g), torch.randint(0, 10, (n_val,), generator=g)
    return data.Data(d.train, d.test, d.classes, val=data.TensorLoader(x, y, 16))


def test_fit_reads_the_test_set_as_asked_and_the_validation_set_every_epoch():
    d = with_val(tiny_data())
    runs = {}
    for policy in train.TEST_POLICIES:
        seed_everything(0)
        runs[policy] = train.fit(models.lenet(bn="torch"), d, 3, 0.1, progress=False, test=policy)
    assert [len(runs[p].test_acc) for p in train.TEST_POLICIES] == [3, 1, 0]
    assert runs["final"].final_test_acc == runs["epochs"].final_test_acc  # the same run
    assert runs["never"].val_acc == runs["epochs"].val_acc and len(runs["never"].val_acc) == 3
    assert runs["never"].final_val_acc == runs["never"].val_acc[-1]
    with pytest.raises(ValueError, match="never read the test set"):
        _ = runs["never"].final_test_acc
    with pytest.raises(ValueError, match="test must be one of"):
        train.fit(models.lenet(), d, 1, 0.1, progress=False, test="sometimes")
    with pytest.raises(ValueError, match="no validation set"):
        _ = History(test_acc=[0.5]).final_val_acc


def test_fit_measures_a_validation_curve_and_the_steps_to_a_threshold():
    d = with_val(tiny_data())
    seed_everything(0)
    h = train.fit(models.lenet(bn="torch"), d, 2, 0.1, progress=False, test="never", eval_every=3)
    assert h.steps == 8 and h.curve_steps == [3, 6]  # 4 steps an epoch, every third step
    assert len(h.curve_val) == 2 and all(0 <= a <= 1 for a in h.curve_val)
    assert h.steps_to(0.0) == 3 and h.steps_to(1.01) == math.inf  # never: the cap
    curve = History(curve_steps=[10, 20, 30], curve_val=[0.1, 0.45, 0.3])
    assert curve.steps_to(0.4) == 20 and curve.steps_to(0.5) == math.inf
    with pytest.raises(ValueError, match="eval_every"):
        History().steps_to(0.4)
    with pytest.raises(ValueError, match="n_val"):
        train.fit(models.lenet(), tiny_data(), 1, 0.1, progress=False, eval_every=2)


def test_fit_learns_a_separable_problem():
    # labels decided by mean brightness: LeNet with BN must beat chance clearly in 5 epochs
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=g)
    x = torch.rand(256, 1, 28, 28, generator=g) * 0.5 + 0.5 * y.view(-1, 1, 1, 1)
    d = data.Data(
        data.TensorLoader(x[:192], y[:192], 32, shuffle=True),
        data.TensorLoader(x[192:], y[192:], 64),
        ["dark", "bright"],
    )
    seed_everything(0)
    h = train.fit(models.lenet(bn="torch"), d, epochs=5, lr=0.1, progress=False)
    assert h.test_acc[-1] > 0.9


@pytest.mark.parametrize("start_training", [True, False])
def test_evaluate_restores_mode_and_uses_running_stats(start_training):
    seed_everything(0)
    model = models.lenet(bn="torch")
    model.train(start_training)
    bn = model[1]
    bn.running_mean.fill_(5.0)  # eval mode must use these, and must not update them
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = tiny_data()
    loss, acc = train.evaluate(model, d.test)
    assert model.training is start_training
    assert all(m.training is start_training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in d.test])
    expected = nn.functional.cross_entropy(logits, d.test.y).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert acc == pytest.approx((logits.argmax(dim=1) == d.test.y).float().mean().item())


def test_evaluate_restores_mode_after_an_error():
    model = models.lenet()
    model.train()
    with pytest.raises(RuntimeError):
        train.evaluate(model, [(torch.zeros(2, 3, 28, 28), torch.zeros(2, dtype=torch.long))])
    assert model.training


def test_other_optimizers_and_bad_arguments():
    seed_everything(0)
    h = train.fit(models.lenet(), tiny_data(), epochs=1, lr=1e-3, optimizer="adam", progress=False)
    assert len(h.test_acc) == 1
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train.fit(models.lenet(), tiny_data(), epochs=1, lr=0.1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr must be > 0"):
        train.fit(models.lenet(), tiny_data(), epochs=1, lr=0.0)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train.fit(models.lenet(), tiny_data(), epochs=0, lr=0.1)


def test_flush_denormals_flushes_inside_and_restores():
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a float32 subnormal
    with train.flush_denormals(True) as supported:
        inside = (tiny * 1.0).item()
    outside = (tiny * 1.0).item()
    assert outside > 0.0
    # x86 with SSE3 flushes; elsewhere torch cannot, says so, and the value must survive
    assert inside == (0.0 if supported else outside)


def test_sweeps_repeat_seeds_and_summarize():
    from bnlab.experiments import sweeps

    d = tiny_data()
    runs = sweeps.train_seeds(
        lambda: models.lenet(bn="torch"), d, [0, 1, 0], 2, 0.5, progress=False
    )
    assert runs[0].test_acc == runs[2].test_acc  # seed 0 twice: same run
    mean, std = sweeps.mean_std(runs, "train_loss")
    values = torch.tensor([r.train_loss for r in runs], dtype=torch.float64)
    assert mean.tolist() == pytest.approx(values.mean(0).tolist())
    assert std.tolist() == pytest.approx(values.std(0).tolist())  # sample std, like torch's
    res = sweeps.lr_sweep([0.01, 1.0], lambda: models.lenet(bn="torch"), d, 1, progress=False)
    assert list(res) == [0.01, 1.0] and all(len(v) == 1 for v in res.values())
    mean, std = sweeps.final_accuracy(res, "test_acc")
    assert mean.tolist() == [res[0.01][0].final_test_acc, res[1.0][0].final_test_acc]
    assert std.tolist() == [0.0, 0.0]


def test_trainable_range_and_decades():
    from bnlab.experiments import sweeps

    lrs = [0.01, 0.1, 1.0, 10.0]
    assert sweeps.trainable_range(lrs, [0.1, 0.6, 0.8, 0.1], 0.5) == (0.1, 1.0)
    assert sweeps.trainable_range(lrs, [0.1] * 4, 0.5) is None
    assert sweeps.decades((0.01, 10.0)) == pytest.approx(3.0)
    assert sweeps.decades(None) == 0.0


def test_progress_bar_ends_on_its_final_count():
    """Throttled redraws (huge mininterval) still end on 3/3: close() redraws once more."""
    import io

    from tqdm import tqdm

    def drawn(bar_class) -> str:
        out = io.StringIO()
        for _ in bar_class(range(3), file=out, mininterval=1e9, miniters=10**9, leave=False):
            pass
        return out.getvalue()

    assert "3/3" not in drawn(tqdm)  # plain tqdm never drew its final count
    assert "3/3" in drawn(train.ProgressBar)


def _bn_classifier() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), modules.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_accuracy_with_batch_stats_leaves_the_model_alone_and_differs_from_eval():
    model = _bn_classifier()
    x, y = torch.randn(60, 4), torch.arange(60) % 3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    loader = TensorLoader(x, y, batch_size=20)
    acc = train.accuracy_with_batch_stats(model, loader)
    assert 0.0 <= acc <= 1.0 and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():  # eval mode: a sample's output does not depend on its batch-mates
        assert torch.equal(model(x[:2])[0], model(x[:1])[0])


def test_accuracy_with_batch_stats_depends_on_the_batch():
    # BN(1) then class 0 if the normalized value is > 0, else class 1. The running stats
    # (mean 0, var 1) keep the sign of x; a batch's own mean moves the threshold.
    bn = modules.BatchNorm1d(1, affine=False)
    head = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    model = nn.Sequential(bn, head).eval()
    x, y = torch.tensor([[1.0], [3.0]]), torch.tensor([0, 0])
    assert evaluate(model, [(x, y)])[1] == 1.0  # running stats: both positive, both class 0
    # batch stats: normalized to (-1, 1), so the first sample flips to class 1
    assert train.accuracy_with_batch_stats(model, [(x, y)]) == 0.5
    # the same first sample with a batch-mate below it is normalized to +1: right again
    assert (
        train.accuracy_with_batch_stats(
            model, [(torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 1]))]
        )
        == 1.0
    )


def test_generalization_gap_compares_eval_accuracies():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
        model[1].bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    data = SimpleNamespace(
        train=TensorLoader(x, torch.tensor([0, 1]), 2),
        test=TensorLoader(x, torch.tensor([0, 0]), 2),
    )
    assert train.generalization_gap(model, data) == {"train": 1.0, "test": 0.5, "gap": 0.5}


def test_epochs_to():
    h = History(test_acc=[0.2, 0.5, 0.7])
    assert h.epochs_to(0.5) == 2
    assert h.epochs_to(0.9) == math.inf


def test_train_step_takes_one_step_and_keeps_the_gradients():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    w0 = model.weight.detach().clone()
    loss, out = train.train_step(model, opt, x, y)
    assert not loss.requires_grad and out.shape == (8, 3)
    torch.testing.assert_close(model.weight, w0 - 0.1 * model.weight.grad)
    b0 = model.bias.detach() + 0.1 * model.bias.grad  # the bias before the step
    assert loss.item() == pytest.approx(nn.functional.cross_entropy(x @ w0.T + b0, y).item())
    custom, _ = train.train_step(model, opt, x, x[:, :3], lambda out, target: (out * target).sum())
    torch.testing.assert_close(model.bias.grad, x[:, :3].sum(0))  # d(sum(out * t))/d bias


def test_train_steps_and_train_epoch_use_every_batch_in_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), modules.BatchNorm1d(8), nn.Linear(8, 3)).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    batches = train.RandomBatches(x, y, batch_size=8, steps=5, seed=3)
    assert len(batches) == 5
    assert [torch.equal(a[0], b[0]) for a, b in zip(batches, batches, strict=True)] == [True] * 5
    losses = train.train_steps(model, opt, batches, progress=False)
    assert len(losses) == 5 and model.training and model[1].num_batches_tracked == 5
    loss, acc = train.train_epoch(model, opt, TensorLoader(x, y, 16))
    assert model[1].num_batches_tracked == 8 and 0 <= acc <= 1 and loss > 0
    with pytest.raises(ValueError, match="no batches"):
        train.train_epoch(model, opt, [])
    with pytest.raises(ValueError, match="same length"):
        train.RandomBatches(x, y[:3], 8, 5)


def test_accuracy_in_eval_mode_or_as_the_model_is():
    model = _bn_classifier()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    model.train()
    in_eval = train.accuracy(model, [(x, y)])
    assert model.training  # mode restored
    as_is = train.accuracy(model, [(x, y)], eval_mode=False)
    assert model[1].num_batches_tracked == 1  # it ran in training mode
    assert in_eval == train.evaluate(model.eval(), [(x, y)])[1]
    assert 0 <= as_is <= 1


def test_train_steps_passes_its_loss_function_on():
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(8, 3)
    losses = train.train_steps(model, opt, [(x, x)], progress=False, loss_fn=nn.functional.mse_loss)
    assert losses[0] == pytest.approx(nn.functional.mse_loss(model(x), x).item())


def test_fit_can_stop_when_the_validation_curve_reaches_a_threshold():
    d = with_val(tiny_data())
    seed_everything(0)
    h = train.fit(
        models.lenet(bn="torch"), d, 5, 0.1, progress=False, test="never", eval_every=2, stop_at=0.0
    )
    assert h.steps == 2 and h.curve_steps == [2] and len(h.train_loss) == 1  # stopped at once
    seed_everything(0)
    full = train.fit(
        models.lenet(bn="torch"),
        d,
        2,
        0.1,
        progress=False,
        test="never",
        eval_every=2,
        stop_at=1.01,
    )
    assert full.steps == 8 and full.steps_to(1.01) == math.inf  # never reached: the whole budget
    with pytest.raises(ValueError, match="stop_at needs eval_every"):
        train.fit(models.lenet(), d, 1, 0.1, progress=False, stop_at=0.5)


def test_a_run_stopped_at_its_threshold_still_reads_the_test_set_once_at_its_end():
    d = with_val(tiny_data())
    seed_everything(0)
    h = train.fit(
        models.lenet(bn="torch"), d, 5, 0.1, progress=False, test="final", eval_every=2, stop_at=0.0
    )
    assert h.steps == 2 and len(h.test_acc) == 1

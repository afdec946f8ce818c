"""The shared training loop: early stopping restores the epoch of lowest validation loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heads.models import build_head
from pipeline.normalisation import Normaliser
from training.fit import FoldData, TrainConfig, evaluate, fit


def test_early_stopping_restores_the_best_epoch():
    rng = np.random.default_rng(0)
    arrays, labels = {}, {}
    for i in range(80):  # training: separable; validation: random labels, so validation loss soon rises
        uid, c = f"u{i}", i % 2
        arrays[uid] = rng.normal(0, 1, (1, 12, 4)).astype(np.float32)
        arrays[uid][0, :, 0] += 2.0 * c
        labels[uid] = c if i < 60 else int(rng.integers(0, 2))
    data = FoldData(lambda u: arrays[u], Normaliser("none"), labels, {u: "s" for u in arrays})
    train_ids, val_ids = [f"u{i}" for i in range(60)], [f"u{i}" for i in range(60, 80)]
    torch.manual_seed(0)
    model = build_head("conv", num_layers=1, input_dim=4, num_classes=2, dropout=0.0)
    config = TrainConfig(epochs=60, patience=3, lr=3e-2, batch_size=10)
    history, best = fit(model, data, train_ids, val_ids, config, np.random.default_rng(0), num_classes=2)
    assert len(history) < 60 and len(history) == best + 3
    assert best == int(history["val_loss"].idxmin()) + 1
    _, val_loss = evaluate(model, data, val_ids, config, torch.ones(2))
    assert val_loss == pytest.approx(history["val_loss"].iloc[best - 1], rel=1e-5)


def _three_class_data():
    """Classes 0 and 1 in training; validation: class 2 (absent from training) first, then 0 and 1."""
    rng = np.random.default_rng(1)
    arrays, labels = {}, {}
    for i in range(48):
        uid = f"u{i}"
        arrays[uid] = rng.normal(0, 1, (1, 10, 4)).astype(np.float32)
        labels[uid] = i % 2 if i < 36 else (2 if i < 42 else i % 2)
    return FoldData(lambda u: arrays[u], Normaliser("none"), labels, {u: "s" for u in arrays}), labels


def test_validation_loss_is_one_weighted_mean_whatever_the_batches():
    """A validation batch holding only a class absent from training (weight 0) adds nothing instead of 0/0 = NaN,
    and the loss is the weighted mean over all ids, the same for any batch size."""
    data, labels = _three_class_data()
    val_ids = [f"u{i}" for i in range(36, 48)]
    torch.manual_seed(0)
    model = build_head("linear", num_layers=1, input_dim=4, num_classes=3, dropout=0.0)
    weight = torch.tensor([0.5, 1.5, 0.0])
    losses = [evaluate(model, data, val_ids, TrainConfig(batch_size=b), weight)[1] for b in (6, 5, 12)]
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(*next(data.batches([u], batch_size=1))[:2]) for u in val_ids])
    y = torch.tensor([labels[u] for u in val_ids])
    expected = float(torch.nn.functional.cross_entropy(logits, y, weight=weight))
    assert all(np.isfinite(losses))
    assert losses == pytest.approx([expected] * 3, rel=1e-5)


@pytest.mark.parametrize("balance", ["weights", "sampler", "none"])
def test_validation_of_untrained_classes_only_keeps_training(capsys, balance):
    """No validation utterance of a trained class: the loss is undefined, so no early stop and the last epoch."""
    data, _ = _three_class_data()
    train_ids, val_ids = [f"u{i}" for i in range(36)], [f"u{i}" for i in range(36, 42)]
    torch.manual_seed(0)
    model = build_head("linear", num_layers=1, input_dim=4, num_classes=3, dropout=0.0)
    config = TrainConfig(epochs=6, patience=2, lr=1e-2, batch_size=8, balance=balance)
    history, best = fit(model, data, train_ids, val_ids, config, np.random.default_rng(0), num_classes=3)
    assert len(history) == 6 and best == 6
    assert "absent from training" in capsys.readouterr().err

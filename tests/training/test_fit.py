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
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.ones(2))
    _, val_loss = evaluate(model, data, val_ids, config, loss_fn)
    assert val_loss == pytest.approx(history["val_loss"].iloc[best - 1], rel=1e-5)

"""The training loop shared by the heads and the MFCC-CNN baseline (the training core): AdamW, class-balanced loss or sampling,
early stopping on validation loss with the best epoch restored, deterministic on CPU for a fixed seed.

The caller seeds (``seed_everything``) and builds the model; :func:`fit` trains it in place.

Example:
    >>> seed_everything(0)                                                              # doctest: +SKIP
    >>> model = build_head("conv", num_layers=1, input_dim=25, num_classes=8)           # doctest: +SKIP
    >>> history = fit(model, data, train_ids, val_ids, config, np.random.default_rng(0))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline.normalisation import Normaliser, Reader
from training.data import batches


class Balance(StrEnum):
    """How training counters class imbalance."""

    WEIGHTS = "weights"  # inverse-frequency loss weights
    SAMPLER = "sampler"  # class-balanced sampling with replacement
    NONE = "none"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults for ``heads.train`` live in params.yaml).

    Attributes:
        epochs: maximum epochs.
        patience: stop after this many epochs without a lower validation loss (0: never stop early).
        lr, weight_decay: AdamW.
        batch_size: utterances per batch.
        max_frames: random training crop (evaluation crops centrally); ``None`` keeps whole utterances.
        balance: ``weights`` (inverse-frequency loss weights), ``sampler`` (class-balanced sampling with
            replacement) or ``none``.
    """

    epochs: int = 50
    patience: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 32
    max_frames: int | None = None
    balance: str = Balance.WEIGHTS

    def __post_init__(self):
        """Refuse settings that would train nothing or train silently wrong (checked before any work)."""
        checks = {"epochs": self.epochs >= 1, "patience": self.patience >= 0, "lr": self.lr > 0,
                  "weight_decay": self.weight_decay >= 0, "batch_size": self.batch_size >= 1,
                  "max_frames": self.max_frames is None or self.max_frames >= 1}
        wrong = [k for k, ok in checks.items() if not ok]
        if wrong:
            found = ", ".join(f"{k}={getattr(self, k)!r}" for k in wrong)
            raise ValueError(f"training settings {found}: expected epochs >= 1, patience >= 0, lr > 0, "
                             "weight_decay >= 0, batch_size >= 1 and max_frames >= 1 (or None for whole "
                             "utterances). Fix the option or params.yaml's train block.")
        if self.balance not in list(Balance):
            raise ValueError(f"unknown balance {self.balance!r}; expected one of {[str(b) for b in Balance]}.")


def recorded_settings(model: type, kwargs: Mapping, config: TrainConfig) -> dict:
    """What a run's ``protocol.settings`` records of a trained model: every keyword of ``model``'s constructor
    as it took effect (the given ones over its defaults; the shapes a run derives from its data left out) and the
    training settings. ``pipeline.compare`` tells systems apart by their protocol, so two runs that differ in a
    head's width or a learning rate are two systems, never one averaged as seeds."""
    derived = {"num_layers", "input_dim", "num_classes"}
    defaults = {name: p.default for name, p in inspect.signature(model).parameters.items()
                if p.default is not inspect.Parameter.empty and name not in derived}
    return {**defaults, **{k: v for k, v in kwargs.items() if k not in derived}, **asdict(config)}


@dataclass
class FoldData:
    """What the loop reads: a reader, the fold's normaliser, labels and speakers of every id."""

    read: Reader
    normalise: Normaliser
    labels: Mapping[str, int]
    speakers: Mapping[str, str]

    def batches(self, ids: Sequence[str], *, batch_size: int, max_frames: int | None = None,
                rng: np.random.Generator | None = None):
        y = np.array([self.labels[i] for i in ids], dtype=np.int64)
        return batches(ids, y, self.read, self.normalise, batch_size=batch_size, speakers=self.speakers,
                       max_frames=max_frames, rng=rng)


def seed_everything(seed: int) -> None:
    """Seed torch and ask for deterministic algorithms (CPU runs then repeat exactly)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency weights ``[C]`` normalised to mean 1 over present classes (absent classes: 0)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    return weights * (counts > 0).sum() / weights.sum()


def _epoch_order(ids: Sequence[str], y: np.ndarray, balance: str, rng: np.random.Generator) -> list[str]:
    if balance == Balance.SAMPLER:
        p = class_weights(y, int(y.max()) + 1)[y]
        return [ids[i] for i in rng.choice(len(ids), size=len(ids), replace=True, p=p / p.sum())]
    return [ids[i] for i in rng.permutation(len(ids))]


@torch.no_grad()
def evaluate(model: nn.Module, data: FoldData, ids: Sequence[str], config: TrainConfig,
             class_weight: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """Class probabilities ``[N, C]`` of ``ids`` and their loss (NaN without ``class_weight``).

    The loss is the cross-entropy weighted by ``class_weight`` over all of ``ids`` at once
    (``sum w_y * loss / sum w_y``), so it does not depend on how the ids fall into batches, and a batch whose
    classes all have weight 0 (absent from training) adds nothing instead of 0/0. NaN when no id has weight.
    """
    model.eval()
    probs, total, weight = [], 0.0, 0.0
    for x, lengths, y in data.batches(ids, batch_size=config.batch_size, max_frames=config.max_frames):
        logits = model(x, lengths)
        probs.append(torch.softmax(logits, dim=-1).numpy())
        if class_weight is not None:
            total += float(nn.functional.cross_entropy(logits, y, weight=class_weight, reduction="sum"))
            weight += float(class_weight[y].sum())
    return np.concatenate(probs), (total / weight if weight > 0 else float("nan"))


def fit(model: nn.Module, data: FoldData, train_ids: Sequence[str], val_ids: Sequence[str],
        config: TrainConfig, rng: np.random.Generator, *, num_classes: int,
        desc: str = "train") -> tuple[pd.DataFrame, int]:
    """Train ``model`` in place; restore the epoch of lowest validation loss (the last epoch when there are no
    validation ids, or none of a class that training has).

    Returns:
        History rows ``epoch, train_loss, val_loss, val_acc`` (epochs from 1), and the best epoch.
    """
    y_train = np.array([data.labels[i] for i in train_ids], dtype=np.int64)
    trained = np.bincount(y_train, minlength=num_classes) > 0  # classes never trained weigh 0 in the validation loss
    weight = class_weights(y_train, num_classes) if config.balance == Balance.WEIGHTS else trained.astype(np.float64)
    class_weight = torch.as_tensor(weight, dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=class_weight)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    y_val = np.array([data.labels[i] for i in val_ids], dtype=np.int64)
    scored = bool(len(val_ids)) and bool(weight[y_val].sum() > 0)
    if len(val_ids) and not scored:
        print(f"warning: {desc}: every validation utterance is of a class absent from training (labels "
              f"{sorted(set(y_val.tolist()))}), so the validation loss is undefined; early stopping is off and the "
              "last epoch is kept.", file=sys.stderr)
    rows, best_loss, best_epoch, best_state = [], float("inf"), 0, None
    progress = tqdm(range(1, config.epochs + 1), desc=desc, unit="epoch", leave=False)
    for epoch in progress:
        model.train()
        total, count = 0.0, 0
        order = _epoch_order(list(train_ids), y_train, config.balance, rng)
        for x, lengths, y in data.batches(order, batch_size=config.batch_size, max_frames=config.max_frames,
                                          rng=rng):
            optimiser.zero_grad()
            loss = loss_fn(model(x, lengths), y)
            loss.backward()
            optimiser.step()
            total, count = total + loss.item() * len(y), count + len(y)
        val_loss, val_acc = float("nan"), float("nan")
        if len(val_ids):
            proba, val_loss = evaluate(model, data, val_ids, config, class_weight)
            val_acc = float(np.mean(proba.argmax(axis=1) == y_val))
        rows.append({"epoch": epoch, "train_loss": total / count, "val_loss": val_loss, "val_acc": val_acc})
        progress.set_postfix(train_loss=f"{total / count:.3f}", val_loss=f"{val_loss:.3f}",
                             val_acc=f"{val_acc:.3f}")
        if not scored or val_loss < best_loss:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(model.state_dict())
        elif config.patience and epoch - best_epoch >= config.patience:
            break
    progress.close()
    if best_state is not None:  # None only when a validation loss was NaN every epoch (diverged training)
        model.load_state_dict(best_state)
    return pd.DataFrame(rows), best_epoch

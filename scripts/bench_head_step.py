"""Benchmark: one training step of conv_egemaps's head (params.yaml's settings) on one thread, ``FastDropout``
against ``nn.Dropout``, then a profile of the step's operators.

Usage: python scripts/bench_head_step.py [--steps 30]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from heads.models import FastDropout, build_head
from training.options import read_settings

#: conv_egemaps's settings, as `dvc repro` trains it.
SETTINGS = read_settings("params.yaml", "systems.conv_egemaps.settings")


def head(plain_dropout: bool) -> nn.Module:
    """The conv head of params.yaml's conv_egemaps over eGeMAPS's 25 descriptors, 8 classes."""
    model = build_head(SETTINGS["head"], num_layers=1, input_dim=25, num_classes=8, hidden=SETTINGS["hidden"],
                       dropout=SETTINGS["dropout"], pooling=SETTINGS["pooling"])
    if plain_dropout:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, FastDropout):
                    setattr(module, name, nn.Dropout(child.p))
    return model


def step_seconds(model: nn.Module, steps: int) -> float:
    """Mean seconds of a training step (forward, backward, AdamW) on a batch of crops of ``max_frames`` frames."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"])
    batch, frames = SETTINGS["batch_size"], SETTINGS["max_frames"]
    x, lengths, y = torch.randn(batch, 1, frames, 25), torch.full((batch,), frames), torch.randint(0, 8, (batch,))
    loss = nn.CrossEntropyLoss()

    def step() -> None:
        optimiser.zero_grad()
        loss(model(x, lengths), y).backward()
        optimiser.step()

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for _ in range(2):  # interleaved, twice
        fast, plain = step_seconds(head(False), args.steps), step_seconds(head(True), args.steps)
        print(f"FastDropout {fast * 1e3:.1f} ms/step   nn.Dropout {plain * 1e3:.1f} ms/step")
    model = head(False)
    with torch.profiler.profile() as profile:
        step_seconds(model, 10)
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()

"""Stage ``probe``: which layer of an encoder carries emotion, one fast linear classifier per layer.

Usage::

    python -m baselines.probe --features data/features/wav2vec2-base --manifest M [--manifest AUG] --split S \\
        --label-set NAME --out data/probes/wav2vec2-base [--encoder-name wav2vec2-base] [--C 1.0] [--seed N]

For every layer of the store, a class-balanced logistic regression (``baselines.models.logistic_regression``)
is fitted on that layer's pooled statistics (per-utterance mean ‖ std, ``FeatureStore.pooled(uid)[layer]``) of
each fold's training and validation utterances, and tested on the fold's test utterances: the same folds,
label set and normalisation as every other system. Each layer is a run directory
``OUT/layer_<hidden-state index, two digits>`` (``layer_00``, ``layer_12``) written by :func:`baselines.train.train_sklearn`, with ``protocol.probe_layer``
(the hidden-state index) and ``protocol.encoder``, so ``pipeline.compare`` scores it like any system (UA with its
bootstrap interval) and draws UA against layer, one line per encoder (Pepino et al., 2021; SUPERB's layer
analysis).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from baselines.train import train_sklearn
from features.store import FeatureStore
from pipeline.cli import existing_dir, positive_float, run_main
from training.options import add_training_args, check_label_set, parse_with_settings, run_trainer
from training.rundir import staged_run


def probe_layers(*, features: str, manifests: Sequence[str], split: str, label_set: str, out: str,
                 encoder_name: str | None = None, merge_calm: bool = False, augmentation: bool = True,
                 normalisation: str = "global", seed: int = 0, C: float = 1.0) -> list[dict]:
    """Fit and test the probe on every layer of ``features``; write ``out/layer_<kk>/`` run directories.

    Args:
        features: feature store of an encoder (its ``pooled`` statistics per layer).
        manifests, split, label_set, merge_calm, augmentation: see ``pipeline.experiment.load_experiment``.
        out: folder of the per-layer run directories (replaced only once every layer has been written).
        encoder_name: the encoder's name in system names (default: the store's folder name).
        normalisation: as :func:`baselines.train.train_sklearn`.
        seed: the classifier's seed.
        C: inverse regularisation strength of the logistic regression.

    Returns:
        The metrics of each layer, in layer order.

    Raises:
        ValueError: as :func:`baselines.train.train_sklearn`.
    """
    with FeatureStore(features) as store:
        hidden_states = list(store.attrs.get("layers", range(store.num_layers)))
    name = encoder_name or Path(features).name
    final = Path(out)
    results = []
    with staged_run(final, keep_foreign=False, owned=r"layer_\d+") as work:  # an earlier probe is replaced only by a complete one
        for position, layer in enumerate(hidden_states):
            metrics = train_sklearn(
                features=features, manifests=manifests, split=split, model="logreg", label_set=label_set,
                out=str(work / f"layer_{int(layer):02d}"), merge_calm=merge_calm, augmentation=augmentation,
                normalisation=normalisation, layers=[position], seed=seed, settings={"C": C},
                system=f"probe_{name}_L{int(layer):02d}", extra_protocol={"probe_layer": int(layer)})
            print(f"layer {layer}: ua {metrics['ua']:.3f}", file=sys.stderr)
            results.append(metrics)
    return results


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baselines.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--features", required=True, type=existing_dir, help="an encoder's feature store")
    parser.add_argument("--encoder-name", default=None, help="name in system names (default: the store's name)")
    parser.add_argument("--C", type=positive_float, default=1.0, help="inverse regularisation of the logistic regression")
    add_training_args(parser)
    args = parse_with_settings(parser, argv)
    check_label_set(args.label_set)

    def train() -> dict:
        layers = probe_layers(features=args.features, manifests=args.manifest, split=args.split,
                              label_set=args.label_set, out=args.out, encoder_name=args.encoder_name,
                              merge_calm=args.merge_calm, augmentation=args.augmentation,
                              normalisation=args.normalisation, seed=args.seed, C=args.C)
        return max(layers, key=lambda m: m["ua"])  # the headline: the best layer

    return run_trainer(args.out, train)


if __name__ == "__main__":
    sys.exit(main())

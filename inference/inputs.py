"""From waveforms to the input a trained run expects, following the feature settings it recorded.

A run directory records how its features were made (``Predictor.feature_settings``: the feature store's attrs plus
the layers used). :func:`run_inputs` turns that record back into a function from mono waveforms to
:meth:`inference.model.Predictor.predict_proba` inputs, reusing the extraction code itself:

============================  =============================================================  ==================
run                           input per waveform                                              computed by
============================  =============================================================  ==================
head over wav2vec2 frames     hidden states of the used layers ``[L, T, H]``                  ``features.encoder``
sklearn over wav2vec2         per-layer mean ‖ std of those ``[L, 2H]``                       ``features.store.mean_std``
head over eGeMAPS             the 25 low-level descriptors ``[1, T, 25]``                     ``features.egemaps``
sklearn over eGeMAPS          the 88 functionals ``[1, 88]``                                  ``features.egemaps``
mfcc_cnn                      the waveform itself (the run computes its log-mel frames)       ``baselines.mfcc_cnn``
============================  =============================================================  ==================

Example:
    >>> inputs = run_inputs(Predictor.from_run(load_run("data/runs/conv_wav2vec2")), device="cpu")   # doctest: +SKIP
    >>> x = inputs([load_audio("clip.flac", sample_rate=inputs.sample_rate)])   # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from features.egemaps import beyond_full_scale, egemaps_features
from features.store import mean_std
from inference.model import Predictor
from pipeline.normalisation import Normalisation


@dataclass
class RunInputs:
    """Computes a run's inputs from waveforms.

    Attributes:
        sample_rate: the rate waveforms must have (Hz).
        description: what is computed, for messages (e.g. ``wav2vec2 /models/base, hidden states [6, 12]``).
        compute: mono ``[N]`` float32 waveforms to one input array each; equal-length waveforms are
            batched where the extractor allows it.
        offset_seconds, max_seconds: the crop the run's store applied to each utterance (``[offset, offset +
            max)`` seconds; 0 and None: none). A caller classifying a whole file reads it cropped so, at the
            file's own rate before resampling, as extraction did (``pipeline.audio.load_audio``); windows of a
            timeline are not cropped.
    """

    sample_rate: int
    description: str
    compute: Callable[[Sequence[np.ndarray]], list[np.ndarray]]
    offset_seconds: float = 0.0
    max_seconds: float | None = None

    def __call__(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.compute(waves)


def encoder_source(settings: dict, override: str | None = None) -> tuple[str, str | None]:
    """Where to load a run's encoder from, and the hub revision to ask for.

    ``override`` (``--encoder``), else the environment variable ``SER_ENCODER``, else the encoder id the
    run recorded (a hub id found in the Hugging Face cache, or the local folder extraction used). The
    recorded hub revision is requested only when the recorded id is used.
    """
    recorded = settings.get("encoder")
    name = override or os.environ.get("SER_ENCODER") or recorded
    if not name or name == "synthetic":
        raise ValueError(f"the run's features came from encoder {recorded!r}, which cannot be loaded; expected "
                         "a hub id or a model folder. Pass --encoder ID_OR_DIR (or set SER_ENCODER).")
    revision = settings.get("revision")
    if name != recorded or not revision or str(revision).startswith("local:") or os.path.isdir(name):
        revision = None
    return str(name), revision


def _wav2vec2(predictor: Predictor, *, encoder: str | None, device: str, dtype: str | None) -> RunInputs:
    from features.encoder import (  # only wav2vec2 runs pay for importing transformers
        FEATURE_ENCODERS,
        load_encoder,
        plugin_version_note,
        resolve_device,
    )

    settings = predictor.feature_settings
    name, revision = encoder_source(settings, encoder)
    dtype = dtype or settings.get("dtype") or "float32"
    on_cpu = resolve_device(device).type == "cpu"
    if dtype == "float16" and on_cpu:
        dtype = "float32"  # features extracted on a GPU in float16: CPUs compute them in float32
    # computed as the run's store was: its recorded feature-encoder implementation and frame grid (a CPU plug-in
    # falls back to the library's modules on a GPU), not a new timing, so the same audio gives the same features
    recorded = settings.get("provenance") or {}
    impl = recorded.get("feature_encoder", "library")
    if impl not in FEATURE_ENCODERS or (FEATURE_ENCODERS[impl] is not None and not on_cpu):
        impl = "library"
    enc = load_encoder(name, device=device, dtype=dtype, revision=revision, feature_encoder=impl,
                       chunk_seconds=float(settings.get("chunk_seconds") or 30.0),
                       overlap_seconds=float(settings.get("overlap_seconds") or 2.0))  # the store's windows
    enc.use_frame_grid(int(recorded.get("frame_grid") or 1))
    if note := plugin_version_note(recorded, enc):
        print(f"warning: {note}", file=sys.stderr)
    layers = list(settings.get("hidden_states") or settings["layers"])
    recorded_rev = settings.get("revision")
    if recorded_rev and enc.revision != recorded_rev:
        print(f"warning: the run's features came from {settings.get('encoder')!r} at revision {recorded_rev}; "
              f"loaded {name!r} at revision {enc.revision}. Predictions are meaningful only with the same "
              "encoder weights.", file=sys.stderr)
    if max(layers) >= enc.num_layers:
        raise ValueError(f"the run reads hidden states {layers}; encoder {name!r} has only {enc.num_layers}. "
                         "Pass the encoder the run was trained on (--encoder).")
    if predictor.kind == "head":
        width = predictor.folds[0][1]["model_kwargs"]["input_dim"]
    else:  # sklearn over mean ‖ std of each used layer
        width = getattr(predictor.folds[0][0], "n_features_in_", 0) // (2 * len(layers))
    if width and width != enc.hidden_size:
        raise ValueError(f"the run expects features of width {width}; encoder {name!r} gives {enc.hidden_size}. "
                         "Pass the encoder the run was trained on (--encoder).")
    pooled = predictor.kind == "sklearn"

    offset, most = float(settings.get("offset_seconds") or 0.0), settings.get("max_seconds")
    most = None if most is None else float(most)

    def compute(waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        states = [enc.hidden_states(w, layers=layers) for w in waves]
        return [mean_std(s) if pooled else s for s in states]

    where = f"{name}@{enc.revision}" if enc.revision else name
    if offset or most is not None:
        where += (f", whole files cropped to [{offset:g}, {'end' if most is None else f'{offset + most:g}'}) s as "
                  "the run's store was (timeline windows are not)")
    return RunInputs(enc.sample_rate, f"wav2vec2 {where} on {enc.device.type} ({enc.dtype}, feature encoder "
                                      f"{enc.feature_encoder}, frame grid {enc.frame_grid}), hidden states "
                                      f"{layers}" + (", mean ‖ std" if pooled else ""), compute, offset, most)


def _egemaps(predictor: Predictor) -> RunInputs:
    rate = int(predictor.feature_settings.get("sample_rate", 16000))
    pick = 0 if predictor.kind == "sklearn" else 1  # functionals [88] or LLDs [T, 25]

    def compute(waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        if any(beyond_full_scale(w) for w in waves):  # said once per process (Python's default warning filter)
            warnings.warn("eGeMAPS: samples beyond 16-bit full scale were clipped there, as extraction clips them "
                          "(openSMILE reads 16-bit audio); lower the level at the source for features of the whole "
                          "signal.", UserWarning, stacklevel=2)
        return [egemaps_features(w, rate)[pick][None] for w in waves]

    return RunInputs(rate, "eGeMAPSv02 " + ("functionals" if pick == 0 else "low-level descriptors"), compute)


def run_inputs(predictor: Predictor, *, encoder: str | None = None, device: str = "auto",
               dtype: str | None = None) -> RunInputs:
    """Build the input computation of ``run`` from its recorded feature settings.

    Args:
        predictor: a run's models (:class:`inference.model.Predictor`).
        encoder: hub id or local folder replacing the recorded encoder (wav2vec2 runs; default: the
            ``SER_ENCODER`` environment variable, else the recorded id).
        device: ``auto``, ``cpu`` or ``cuda`` for the encoder.
        dtype: encoder compute dtype (default: the one recorded at extraction).

    Raises:
        ValueError: unknown feature kind, an encoder that does not fit the run, or a scikit-learn run with
            ``speaker`` normalisation (it needs many utterances of one speaker at once).
        OSError: the encoder cannot be loaded.
    """
    kind = predictor.feature_settings.get("kind")
    if predictor.kind == "sklearn" and predictor.normalisation == Normalisation.SPEAKER:
        raise ValueError(f"{predictor.path}: a scikit-learn run with speaker normalisation z-scores many utterances of "
                         "one speaker together; expected a run with global normalisation, as heads.predict "
                         "classifies recordings one at a time.")
    if predictor.normalisation == Normalisation.SPEAKER:
        print(f"warning: {predictor.path} was trained with speaker normalisation; here each recording is "
              "standardised with its own statistics (in evaluation, with all of its speaker's utterances), so "
              "probabilities differ from the run's evaluation of the same audio. Prefer a run with global "
              "normalisation for single recordings.", file=sys.stderr)
    if predictor.kind == "mfcc_cnn":
        rate = int(predictor.feature_settings.get("sample_rate", 16000))
        return RunInputs(rate, f"log-mel frames ({kind})", lambda waves: [np.asarray(w) for w in waves])
    if kind == "egemaps":
        return _egemaps(predictor)
    if kind == "wav2vec2":
        return _wav2vec2(predictor, encoder=encoder, device=device, dtype=dtype)
    raise ValueError(f"{predictor.path}: feature kind {kind!r}; expected wav2vec2, egemaps or an mfcc_cnn run.")

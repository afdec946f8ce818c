"""``python -m heads.predict``: classify new recordings with a trained run, optionally as a timeline of segments.

Usage::

    python -m heads.predict FILE... --model RUN_DIR [--segment-seconds S] [--hop-seconds S]
        [--format json|csv|table] [--plot OUT.png] [--encoder ID_OR_DIR] [--device auto|cpu|cuda] [--verbose]

Any audio libsndfile reads (any rate, mono or stereo) is downmixed and resampled to the rate of the run's
features, which are computed as the run recorded them (``inference.inputs``). Per file:

- a file of at most ``--max-whole-seconds`` (30 s) is classified in one pass over the whole utterance, as
  training saw its utterances (cropped as the run's store cropped them, ``--offset-seconds`` and
  ``--max-seconds`` of ``features.extract``, read at the file's own rate as extraction read it); a longer one is streamed segment by segment in bounded memory and its label is
  the duration-weighted mean of the segments' probabilities (segments of ``--segment-seconds``, or 3 s);
- with ``--segment-seconds S``, the timeline: windows every ``--hop-seconds`` (default ``S``) of ``S`` seconds,
  the last ending at the end of the file (a final piece shorter than ``S / 2`` joins the previous window; a
  file shorter than ``S`` is one segment covering it; windows are never cropped). A segment of digital silence (all samples zero) is not
  classified: ``label`` and ``probabilities`` are null and it carries ``"silent": true``.
- failures are per file: a missing file, unreadable or corrupt audio, a recording whose samples are all zero
  or non-finite, or shorter than 0.25 s give an entry with ``file``, ``error`` and ``reason``; the other files
  are still processed and the exit status is 1 (2 for a bad command line or an unusable run directory).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from features.hardware import Device, DType, device_arg
from inference.formats import OutputFormat, to_csv, to_json, to_table
from inference.inputs import RunInputs, run_inputs
from inference.model import Predictor
from inference.timeline import cut_windows, plan_segments, plot_timelines, weighted_mean
from pipeline.audio import (
    MIN_SECONDS,
    AudioError,
    audio_info,
    check_complete,
    check_samples,
    load_audio,
    stream_audio,
)
from pipeline.cli import existing_dir, output_file, positive_float, positive_int, run_main
from pipeline.normalisation import Normalisation
from training.rundir import load_run

MIN_SEGMENT_SECONDS = 0.5
DEFAULT_SEGMENT_SECONDS = 3.0
BAR = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s audio [{elapsed}<{remaining}, {rate_fmt}]"


def _probabilities(labels: Sequence[str], p: np.ndarray) -> dict[str, float]:
    return {label: round(float(v), 6) for label, v in zip(labels, p, strict=True)}


def classify_windows(windows: Iterable[tuple[float, float, np.ndarray]], *, predictor: Predictor, inputs: RunInputs,
                     batch_size: int = 8,
                     progress: tqdm | None = None) -> Iterator[tuple[float, float, np.ndarray | None]]:
    """Class probabilities of consecutive windows, batching neighbours of equal length.

    Args:
        windows: ``(start, end, wave [N])`` as :func:`inference.timeline.cut_windows` yields them.
        predictor, inputs: the run's models and their input computation.
        batch_size: windows per forward pass (equal lengths only: no padding reaches the encoder).
        progress: advanced by each window's new seconds of audio.

    Yields:
        ``(start, end, probabilities [C])``; probabilities are ``None`` for an all-zero window.
    """
    batch: list[tuple[float, float, np.ndarray]] = []
    done = 0.0
    per_input = predictor.normalisation == Normalisation.SPEAKER  # statistics of each input alone, not of a batch

    def advance(start: float, end: float) -> None:
        nonlocal done
        if progress is not None:  # resampled ends can pass the header's duration by a few samples
            progress.update(max(0.0, min(end, progress.total) - max(start, done, progress.n)))
        done = max(done, end)

    def flush() -> Iterator[tuple[float, float, np.ndarray]]:
        if not batch:
            return
        x = inputs([w for _, _, w in batch])
        probs = (np.concatenate([predictor.predict_proba([xi], all_layers=False) for xi in x]) if per_input
                 else predictor.predict_proba(x, all_layers=False))  # inputs compute the used layers only
        for (start, end, _), p in zip(batch, probs, strict=True):
            advance(start, end)
            yield start, end, p
        batch.clear()

    for start, end, wave in windows:
        if batch and (len(wave) != len(batch[0][2]) or len(batch) >= batch_size):
            yield from flush()
        if not np.any(wave):
            yield from flush()
            advance(start, end)
            yield start, end, None
            continue
        batch.append((start, end, wave))
    yield from flush()


def timeline(blocks: Iterable[np.ndarray], duration: float, *, predictor: Predictor, inputs: RunInputs, segment: float,
             hop: float, batch_size: int = 8, progress: tqdm | None = None) -> tuple[list[dict], np.ndarray | None]:
    """Classify the windows of one recording.

    Args:
        blocks: the recording as contiguous mono blocks at ``inputs.sample_rate``.
        duration: its length in seconds (from the header), for :func:`inference.timeline.plan_segments`.
        predictor, inputs, batch_size, progress: as for :func:`classify_windows`.
        segment, hop: window length and hop in seconds.

    Returns:
        The segments ``{start, end, label, probabilities}`` (silent ones: ``label`` and ``probabilities``
        None, ``silent`` True), and the duration-weighted mean probabilities ``[C]`` of the others (None
        when every window is silent).
    """
    windows = cut_windows(blocks, plan_segments(duration, segment=segment, hop=hop), sample_rate=inputs.sample_rate)
    segments, probs, weights = [], [], []
    for start, end, p in classify_windows(windows, predictor=predictor, inputs=inputs, batch_size=batch_size,
                                          progress=progress):
        seg = {"start": round(start, 3), "end": round(end, 3)}
        if p is None:
            seg.update(label=None, probabilities=None, silent=True)
        else:
            seg.update(label=predictor.labels[int(np.argmax(p))], probabilities=_probabilities(predictor.labels, p))
            probs.append(p)
            weights.append(end - start)
        segments.append(seg)
    return segments, (weighted_mean(np.stack(probs), weights) if probs else None)


def predict_file(path: str, *, predictor: Predictor, inputs: RunInputs, segment_seconds: float | None = None,
                 hop_seconds: float | None = None, max_whole_seconds: float = 30.0, batch_size: int = 8,
                 block_seconds: float = 30.0, verbose: bool = False) -> dict:
    """Classify one recording.

    Args:
        path: any file libsndfile reads.
        predictor, inputs: the run's models (``inference.model.Predictor``) and their inputs
            (``inference.inputs.run_inputs``).
        segment_seconds: timeline window ``S`` (``None``: no timeline).
        hop_seconds: seconds between window starts (default ``S``; at most ``S``).
        max_whole_seconds: longest file classified in one pass; longer ones are streamed and labelled from
            their segments (of ``S``, or :data:`DEFAULT_SEGMENT_SECONDS`).
        batch_size: windows per forward pass.
        block_seconds: audio decoded at a time when streaming.
        verbose: progress bar (seconds of audio per second) on stderr.

    Returns:
        ``{"file", "duration_s", "label", "probabilities", "label_from": "whole"|"segments"}`` plus
        ``"segments"`` (see :func:`timeline`) with ``segment_seconds``.

    Raises:
        AudioError: ``missing``, ``empty``, ``unreadable``, ``truncated``, ``no_samples``, ``corrupt``,
            ``silent``, ``non_finite`` or ``too_short`` (see the module docstring).
        ValueError: the features cannot be computed for this audio.
    """
    if os.path.isdir(path):
        raise AudioError("folder", f"{path}: is a folder; expected an audio file. Pass the recordings inside it "
                                   f"(e.g. {os.path.join(path, '*.wav')}).")
    if not os.path.isfile(path):
        raise AudioError("missing", f"{path}: no such file; expected an audio file. Check the path.")
    info = audio_info(path)
    check_complete(info)  # a truncated copy would be classified at part of its length
    check_samples(info)
    duration = info.duration_s
    if duration < MIN_SECONDS:
        raise AudioError("too_short", f"{path}: lasts {duration:.3f} s; expected at least {MIN_SECONDS} s of audio.")
    whole = duration <= max_whole_seconds
    segment = segment_seconds or (None if whole else DEFAULT_SEGMENT_SECONDS)
    result: dict = {"file": str(path), "duration_s": round(duration, 3)}
    with tqdm(total=duration, unit="s", unit_scale=True, desc=os.path.basename(path), bar_format=BAR,
              disable=not verbose, leave=False) as bar:
        if whole:  # one pass over the whole utterance, cropped as the run's store cropped its utterances
            wave = load_audio(path, sample_rate=inputs.sample_rate, offset_s=inputs.offset_seconds,
                              duration_s=inputs.max_seconds)
            cropped = inputs.offset_seconds or inputs.max_seconds is not None
            # the whole file again only where a crop was read and the timeline or the silence check needs more
            full = load_audio(path, sample_rate=inputs.sample_rate) if cropped and (
                segment or not np.any(wave)) else wave
            if not np.any(full):  # channels that cancel: each has signal (the header scan passed), their mean none
                raise AudioError("silent", f"{path}: every sample is zero once its channels are averaged to mono "
                                           "(they cancel out); expected a recording with signal. Check its wiring "
                                           "or pass one channel.")
            p = predictor.predict_proba(inputs([wave]), all_layers=False)[0]
            blocks: Iterable[np.ndarray] = [full]
            bar.update(0.0 if segment else duration)
        else:
            blocks = stream_audio(path, sample_rate=inputs.sample_rate, block_seconds=block_seconds)
        if segment:
            segments, mean = timeline(blocks, duration, predictor=predictor, inputs=inputs, segment=segment,
                                      hop=hop_seconds or segment, batch_size=batch_size, progress=bar)
    if not whole:
        if mean is None:
            raise AudioError("silent", f"{path}: every segment is digital silence; expected a recording with signal.")
        p = mean
    result.update(label=predictor.labels[int(np.argmax(p))], probabilities=_probabilities(predictor.labels, p),
                  label_from="whole" if whole else "segments")
    if segment_seconds:
        result["segments"] = segments
    return result


def predict_files(paths: Sequence[str], *, predictor: Predictor, inputs: RunInputs, verbose: bool = False, **kw) -> list[dict]:
    """:func:`predict_file` on each path; a failing file becomes ``{"file", "error", "reason"}``.

    Args:
        paths: the recordings.
        predictor, inputs, kw: as for :func:`predict_file`.
        verbose: progress bars and, per file, the real-time factor (wall time / audio duration) on stderr.
    """
    results = []
    for path in paths:
        t0 = time.perf_counter()
        try:
            results.append(predict_file(path, predictor=predictor, inputs=inputs, verbose=verbose, **kw))
        except (AudioError, OSError, ValueError) as err:
            reason = getattr(err, "reason", "features" if isinstance(err, ValueError) else "unreadable")
            results.append({"file": str(path), "error": str(err), "reason": reason})
        wall = time.perf_counter() - t0
        if verbose:
            r = results[-1]
            if "error" in r:
                print(f"{path}: failed ({r['reason']}) after {wall:.2f} s", file=sys.stderr)
            else:
                print(f"{path}: {r['duration_s']:.1f} s of audio in {wall:.2f} s, real-time factor "
                      f"{wall / r['duration_s']:.4f} ({r['duration_s'] / wall:.1f} s of audio per second)",
                      file=sys.stderr)
    return results


@run_main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m heads.predict", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", metavar="FILE", help="recordings (any format libsndfile reads)")
    p.add_argument("--model", required=True, type=existing_dir,
                   help="run directory written by heads.train or baselines.train")
    p.add_argument("--segment-seconds", type=positive_float, default=None, help="timeline window length S")
    p.add_argument("--hop-seconds", type=positive_float, default=None, help="seconds between windows (default S)")
    p.add_argument("--max-whole-seconds", type=positive_float, default=30.0,
                   help="longest file classified in one pass; longer files are labelled from segments")
    p.add_argument("--format", default="json", choices=list(OutputFormat))
    p.add_argument("--plot", default=None, type=output_file, help="PNG of class probabilities over time (one panel per file)")
    p.add_argument("--encoder", default=None, help="hub id or local folder (default: $SER_ENCODER, else the run's)")
    p.add_argument("--device", default=Device.AUTO, type=device_arg, metavar="{auto,cpu,cuda,cuda:N}")
    p.add_argument("--dtype", default=None, choices=[d for d in DType if d != DType.AUTO],
                   help="encoder compute dtype (default: the one used at extraction)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="segments per forward pass")
    p.add_argument("--verbose", action="store_true", help="progress and real-time factor on stderr")
    a = p.parse_args(argv)
    if a.segment_seconds is not None and a.segment_seconds < MIN_SEGMENT_SECONDS:
        p.error(f"--segment-seconds {a.segment_seconds}: expected at least {MIN_SEGMENT_SECONDS} s.")
    if a.hop_seconds is not None and not (a.segment_seconds and 0 < a.hop_seconds <= a.segment_seconds):
        p.error("--hop-seconds: expected 0 < hop <= --segment-seconds (segments cover the whole file).")
    if a.plot and not a.segment_seconds:
        p.error("--plot draws the timeline; expected --segment-seconds too.")
    t0 = time.perf_counter()
    try:
        predictor = Predictor.from_run(load_run(a.model))
        inputs = run_inputs(predictor, encoder=a.encoder, device=a.device, dtype=a.dtype)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.encoder and predictor.feature_settings.get("kind") != "wav2vec2":
        print(f"warning: --encoder ignored: {a.model} does not use wav2vec2 features.", file=sys.stderr)
    if a.verbose:
        print(f"{a.model}: {predictor.model} ({predictor.kind}, {len(predictor.folds)} folds, labels {predictor.labels}); inputs: "
              f"{inputs.description}; loaded in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    t1 = time.perf_counter()
    results = predict_files(a.files, predictor=predictor, inputs=inputs, verbose=a.verbose, segment_seconds=a.segment_seconds,
                            hop_seconds=a.hop_seconds, max_whole_seconds=a.max_whole_seconds,
                            batch_size=a.batch_size)
    ok = [r for r in results if "error" not in r]
    if a.verbose and ok:
        audio, wall = sum(r["duration_s"] for r in ok), time.perf_counter() - t1
        print(f"total: {audio:.1f} s of audio in {wall:.2f} s, real-time factor {wall / audio:.4f}", file=sys.stderr)
    sys.stdout.write({"json": to_json, "csv": to_csv, "table": to_table}[a.format](results, predictor.labels))
    status = 1 if len(ok) < len(results) else 0
    if a.plot:
        try:
            plot_timelines(results, predictor.labels, a.plot)
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

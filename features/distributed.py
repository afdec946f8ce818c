"""Extraction beyond one machine: Ray actors, or deterministic shards for a scheduler people already have.

Both reuse the single-machine engine of :mod:`features.extract` unchanged: the rows of a run are planned into the
same forward passes (over all wanted rows, so results equal the single-machine ones bit for bit), cut into tasks,
and each task is encoded whole into one immutable shard of the store (:class:`features.cache.PartWriter`, the
same per-task work as a forked worker process). The store path may be on a shared filesystem: shard names are
unique per writer and a shard becomes visible only by an atomic rename.

* ``--engine ray`` (:class:`RayActors`): one actor per GPU (or per CPU core, single-threaded) loads the encoder
  once and writes the shards of the tasks it is handed; the driver registers each finished shard. A killed actor
  is restarted by Ray and its task, whose shard was never published, is run again (``max_restarts`` and
  ``max_task_retries``); what was published before stays.
* ``--shard K/N`` (:func:`shard_ids`): the passes, planned over every manifest row (readable on that machine or
  not), are dealt round-robin into N shards, so N invocations (a SLURM array job) agree on who computes what,
  whatever is already stored; choices timed at start-up (``--dtype auto``, ``--feature-encoder auto``) are
  recorded by the first member to make them and followed by the others. A member publishes its shards only; the
  final call without ``--shard`` indexes them and writes the view (and computes whatever a failed member left).

Example:
    ray start --head --num-gpus 8            # then `ray start --address HEAD:6379` on each worker node
    python -m features.extract --manifest data/manifest.csv --out /shared/features/wav2vec2.h5 \\
        --engine ray --address auto
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from functools import partial
from pathlib import Path

import torch

from features.encoder import Encoder, load_encoder
from pipeline.cli import UsageError

try:  # optional: pip install -e ".[ray]"
    import ray
    from ray.util import ActorPool
except ImportError:  # pragma: no cover - depends on the install
    ray = None


class Engine(StrEnum):
    """What runs an extraction's tasks."""

    LOCAL = "local"  # this machine: worker processes (CPU) or one process (CUDA)
    RAY = "ray"      # actors on a Ray cluster


class ShardError(ValueError, argparse.ArgumentTypeError):
    """A ``--shard`` value that is not ``K/N``: a ValueError whose message argparse prints as it is."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (1 <= K <= N) -> ``(K, N)``.

    Raises:
        ShardError: not two integers ``K/N`` with 1 <= K <= N.
    """
    try:
        k, n = (int(s) for s in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise ShardError(f"--shard {text!r}: expected K/N with 1 <= K <= N (e.g. 2/8 for the second of eight; "
                         "a SLURM array job passes $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT).")
    return k, n


def shard_ids(passes: Sequence[Sequence[dict]], shard: tuple[int, int]) -> set[str]:
    """The row ids of shard ``(K, N)``: passes ``K-1, K-1+N, ...`` of ``passes``.

    ``passes`` must be planned over every manifest row (done or not), so that the N shards are the same on every
    machine and in every run; passes come longest first, so round-robin dealing gives each shard a similar
    amount of audio.
    """
    k, n = shard
    return {row["id"] for batch in passes[k - 1::n] for row in batch}


class RayMissing(UsageError, ImportError):
    """``--engine ray`` without Ray installed: a usage error (exit status 2) that is also an ImportError."""


def require_ray() -> None:
    """Raises :class:`RayMissing` with the install command when Ray is not installed."""
    if ray is None:
        raise RayMissing("--engine ray: expected the Ray library, found it not installed. Install the extra: "
                          "pip install -e \".[ray]\" (or pip install \"ray>=2.9\").")


def check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Refuse a ``HOST:PORT`` address where nothing answers (Ray's own connection attempt retries for ever there);
    ``auto``, ``ray://`` client addresses and None are left to Ray, which fails fast on them.

    Raises:
        ConnectionError: nothing accepts a connection at ``HOST:PORT`` within ``timeout`` seconds.
    """
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # Ray explains a malformed address itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(f"--address {address}: expected the Ray head's address (HOST:PORT, as `ray start "
                              f"--head` prints it), found nothing answering there ({err}). Start the head, check "
                              "the host and port, or leave --address out to start a local cluster.") from err


def by_reference(fn: Callable) -> Callable:
    """``fn`` as its module imported by name holds it: a function of a module run with ``python -m`` belongs to
    ``__main__``, which Ray would ship by value with a copy of every module global it touches (so state that
    one call sets would be invisible to the next); by name, each actor imports the module once and shares it."""
    spec = getattr(sys.modules.get(fn.__module__), "__spec__", None)
    if fn.__module__ != "__main__" or spec is None:
        return fn
    return getattr(importlib.import_module(spec.name), fn.__qualname__)


def thread_environment() -> dict[str, str]:
    """The thread settings an actor process starts with: this process's.

    Ray starts a worker of ``num_cpus=1`` with ``OMP_NUM_THREADS=1``, and a math library that starts with one
    thread computes along other code paths (other rounding) than one started with several and then set to one
    thread, as this process and its forked workers are; so the actors get this process's settings instead.
    """
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return env


def encoder_facts(enc: Encoder) -> dict:
    """What every actor's encoder must share with the driver's for the shards to be the driver's own (the
    libraries included: another torch or transformers may round differently)."""
    import transformers

    return {"revision": enc.revision, "dtype": enc.dtype, "device": enc.device.type,
            "chunk_seconds": enc.chunk_seconds, "overlap_seconds": enc.overlap_seconds,
            "torch": torch.__version__, "transformers": transformers.__version__}


class _Extractor:
    """A Ray actor: loads the encoder once (``load()``), prepares its process as a forked worker is prepared
    (``init(enc)``), then runs ``work(batches, part, meta, job)`` per task with the feature-encoder implementation
    and frame grid the task names (the driver chooses them while the actors load; a restarted actor learns them
    again), after checking that its encoder is the driver's (:func:`encoder_facts`)."""

    def __init__(self, load: Callable, init: Callable, work: Callable):
        self.enc = load()
        init(self.enc)
        self._work = work

    def work(self, batches: list, part: str, meta: dict, job, expected: dict, feature_encoder: str,
             frame_grid: int = 1) -> tuple:
        found = encoder_facts(self.enc)
        if found != expected:
            raise ValueError(f"actor on {os.uname().nodename}: expected an encoder with {expected}, found "
                             f"{found}; give every node the same hardware kind, model files and torch/transformers "
                             "versions, or pass --device and --dtype.")
        if self.enc.feature_encoder != feature_encoder:
            self.enc.use_feature_encoder(feature_encoder)
        self.enc.use_frame_grid(frame_grid)
        return self._work(batches, part, meta, job)


def remote_error(message: str) -> str:
    """The exception at the end of a remote traceback that Ray's message carries (``OSError: ...`` and the lines
    after it), or the whole message where there is none."""
    lines = message.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^(\w+\.)*\w*(Error|Exception)(\(|:)", lines[i]):
            return "\n".join(lines[i:]).strip()
    return message.strip()


class RayActors:
    """Connects to a Ray cluster (``address``: ``auto``, ``HOST:PORT``, or None to start a local one unless this
    process is already connected) and starts one actor per GPU (``gpu``) or per CPU, each running
    ``load_encoder(**load)`` and then ``init(enc)``. Creating them returns at once: they load while this process
    goes on (loads its own copy, plans, times the feature encoder), which is most of their start-up hidden.

    :meth:`run` (or :meth:`close`) stops the actors, and the local cluster if it started one.

    Raises:
        ImportError: Ray is not installed.
        ValueError: the cluster has no GPU (``gpu``) or no CPU to run an actor on.
    """

    def __init__(self, address: str | None, *, load: dict, gpu: bool, init: Callable, work: Callable,
                 max_restarts: int = 3):
        require_ray()
        self._started = not ray.is_initialized()
        if self._started:
            check_reachable(address)
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        self.size = int(resources.get("GPU" if gpu else "CPU", 0))
        self.max_restarts = max_restarts
        self._actors: list = []
        if self.size < 1:
            self.close()
            raise ValueError(f"Ray cluster {address or 'local'}: expected at least one {'GPU' if gpu else 'CPU'}, "
                             f"found resources {resources}; start workers with GPUs, or pass --device cpu.")
        options = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
        remote = ray.remote(_Extractor).options(**options, max_restarts=max_restarts, max_task_retries=max_restarts,
                                                runtime_env={"env_vars": thread_environment()})
        load = partial(load_encoder, **{**load, "feature_encoder": "library"})
        init, work = by_reference(init), by_reference(work)
        self._actors = [remote.remote(load, init, work) for _ in range(self.size)]

    @classmethod
    def like(cls, address: str | None, enc: Encoder, **kw) -> RayActors:
        """Actors loading what ``enc`` was loaded from (same checkpoint and revision, device kind, dtype, window)."""
        load = {"name_or_dir": enc.name, "device": enc.device.type, "dtype": enc.dtype, "revision": enc.revision,
                "chunk_seconds": enc.chunk_seconds, "overlap_seconds": enc.overlap_seconds}
        return cls(address, load=load, gpu=enc.device.type == "cuda", **kw)

    def keep(self, most: int) -> None:
        """Stop the actors beyond the first ``most`` (a run with fewer passes than actors)."""
        for actor in self._actors[most:]:
            ray.kill(actor)
        self._actors = self._actors[:most]
        self.size = len(self._actors)

    def run(self, tasks: Sequence[list], parts: Sequence[str], meta: dict, job, *, enc: Encoder) -> Iterator[tuple]:
        """Run ``work(task, part, meta, job)`` for each task on the actors, with the driver's encoder ``enc``'s
        feature-encoder implementation and frame grid (and refusing actors whose encoder differs from it); yields
        the results in the order they finish, then stops the actors (and the cluster, if it started it). A task
        whose actor dies is run again on the restarted actor.

        Raises:
            OSError: an actor died more than ``max_restarts`` times (its task's shard was never published).
        """
        expected, name, grid = encoder_facts(enc), enc.feature_encoder, enc.frame_grid
        try:
            pool = ActorPool(self._actors)
            yield from pool.map_unordered(
                lambda actor, item: actor.work.remote(item[0], item[1], meta, job, expected, name, grid),
                list(zip(tasks, parts, strict=True)))
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, OSError):  # as the local path raises it: errno kept (a full disk is explained)
                raise err.cause from err
            raise
        except ray.exceptions.RayActorError as err:  # as the local path says it of a dead worker process
            if err.actor_init_failed:  # its constructor raised (e.g. no model folder on its node): say what
                raise OSError(f"a Ray actor could not load the encoder: {remote_error(str(err))}\nExpected every "
                              "node to have the same code, environment and model files at the same paths "
                              "(docs/scale.md). Finished shards are kept: rerun to resume.") from err
            raise OSError(f"a Ray actor died more often than it may be restarted ({self.max_restarts} times): "
                          f"{str(err).splitlines()[0].rstrip('.')}. Finished shards are kept: rerun to resume once "
                          "the cause (memory, a lost node, a signal) is gone.") from err
        finally:
            self.close()

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False


def shard_summary(build, *, shard: tuple[int, int], skipped: list[dict], computed: int,
                  audio_seconds: float) -> dict:
    """End a ``--shard`` member: publish its last shard (no index, no view: the final call writes them) and
    print and return its summary. Its skips are printed, not written: the final call retries those rows and
    writes the skips report."""
    build.finish(view=False)
    k, n = shard
    for skip in skipped:
        print(f"skipped {skip['id']} ({skip['reason']}): {skip['detail']}")
    print(f"extract shard {k}/{n}: {computed} computed ({audio_seconds:.1f} s of audio), {len(skipped)} skipped; "
          f"shards in {Path(build.store_dir)}; run once more without --shard to index them and write the view")
    return {"computed": computed, "reused": build.reused, "skipped": len(skipped), "stored": None,
            "removed": 0, "corrupt": build.corrupt, "audio_seconds": round(audio_seconds, 2)}

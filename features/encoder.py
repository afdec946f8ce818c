"""A frozen wav2vec2-family encoder (wav2vec2, HuBERT, WavLM): loading and exact forward passes.

Exactness: wav2vec2-base's first convolution is followed by GroupNorm over the whole input, so zero padding
changes every frame. :meth:`Encoder.forward` therefore takes only batches of equal length, with no padding
and no attention mask. Inputs longer than one window are cut into windows that overlap by
``overlap_seconds`` of context on each side; only the centre frames of each window are kept, aligned to the
global frame grid, so memory stays bounded for any duration (windowed frames are then close to, not equal
to, a single forward pass).

Example:
    >>> enc = load_encoder("facebook/wav2vec2-base", dtype="bfloat16")    # doctest: +SKIP
    >>> enc.hidden_states(wave).shape                                      # doctest: +SKIP
    (13, 174, 768)
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import parametrize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_ENCODER = "facebook/wav2vec2-base"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch finds no CUDA GPU; pass --device cpu or auto.")
    return torch.device(device)


def _fingerprint_dir(folder: Path) -> str:
    """Content hash of a local model folder's config and weights (its 'revision')."""
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin"}:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return "local:" + h.hexdigest()


class Encoder:
    """A loaded, frozen encoder; build it with :func:`load_encoder`.

    Attributes:
        name, revision: what was loaded (``revision`` is the hub commit, or ``local:<hash>`` for a folder).
        sample_rate: the rate the encoder expects (Hz).
        num_layers: hidden states returned, ``L`` (transformer input + every layer: 13 for base).
        hidden_size: ``H``.  stride, receptive_field: samples per frame and samples seen by one frame.
    """

    def __init__(self, model, feature_extractor, *, name: str, revision: str | None, device: torch.device,
                 dtype: str, chunk_seconds: float, overlap_seconds: float):
        cfg = model.config
        self.model, self.feature_extractor = model, feature_extractor
        self.name, self.revision, self.device, self.dtype = name, revision, device, dtype
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.num_layers = int(cfg.num_hidden_layers) + 1
        self.hidden_size = int(cfg.hidden_size)
        self._convs = list(zip(cfg.conv_kernel, cfg.conv_stride, strict=True))
        self.stride = math.prod(s for _, s in self._convs)
        self.receptive_field = 1
        for kernel, stride in reversed(self._convs):
            self.receptive_field = (self.receptive_field - 1) * stride + kernel
        self.window_frames = max(1, round(chunk_seconds * self.sample_rate / self.stride))
        self.context_frames = max(0, round(overlap_seconds * self.sample_rate / self.stride))
        self.chunk_seconds = self.window_frames * self.stride / self.sample_rate
        self.overlap_seconds = self.context_frames * self.stride / self.sample_rate

    def num_frames(self, num_samples: int) -> int:
        """Frames ``T`` the encoder produces for ``num_samples`` input samples (0 when too short)."""
        n = num_samples
        for kernel, stride in self._convs:
            n = (n - kernel) // stride + 1
            if n <= 0:
                return 0
        return n

    @property
    def max_single_samples(self) -> int:
        """Longest input run in a single forward pass (longer ones are windowed)."""
        return (self.window_frames + 2 * self.context_frames - 1) * self.stride + self.receptive_field

    def normalise(self, wave: np.ndarray) -> np.ndarray:
        """Apply the encoder's own feature extractor (zero mean, unit variance for wav2vec2-base): ``[N] -> [N]``."""
        out = self.feature_extractor(np.asarray(wave, dtype=np.float32), sampling_rate=self.sample_rate,
                                     return_tensors="np")
        return np.asarray(out["input_values"][0], dtype=np.float32)

    @torch.inference_mode()
    def forward(self, batch: np.ndarray, *, layers: Sequence[int] | None = None) -> np.ndarray:
        """One forward pass over already-normalised inputs of equal length (no padding, no mask).

        Args:
            batch: ``[B, N]`` float32, normalised with :meth:`normalise`.
            layers: hidden-state indices to return (default all).

        Returns:
            ``[B, L, T, H]`` float32.
        """
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.to(DTYPES[self.dtype])
        states = self.model(x, output_hidden_states=True).hidden_states
        picked = states if layers is None else [states[i] for i in layers]
        return torch.stack(picked, dim=1).float().cpu().numpy()

    def iter_hidden_states(self, wave: np.ndarray, *, layers: Sequence[int] | None = None,
                           normalised: bool = False) -> Iterator[np.ndarray]:
        """Hidden states of one utterance as consecutive ``[L, t, H]`` pieces (windowed when long).

        Args:
            wave: ``[N]`` float32 at :attr:`sample_rate`.
            layers: hidden-state indices (default all).
            normalised: ``wave`` has already been through :meth:`normalise`.

        Raises:
            ValueError: ``wave`` is shorter than one frame's receptive field.
        """
        x = wave if normalised else self.normalise(wave)
        total = self.num_frames(len(x))
        if total == 0:
            raise ValueError(f"expected at least {self.receptive_field} samples ({self.receptive_field / self.sample_rate * 1000:.0f} ms) "
                             f"for one frame, found {len(x)}; drop or pad such clips upstream.")
        if len(x) <= self.max_single_samples:
            yield self.forward(x[None], layers=layers)[0]
            return
        for start in range(0, total, self.window_frames):
            stop = min(total, start + self.window_frames)
            lo, hi = max(0, start - self.context_frames), min(total, stop + self.context_frames)
            out = self.forward(x[None, lo * self.stride:(hi - 1) * self.stride + self.receptive_field], layers=layers)[0]
            yield out[:, start - lo:stop - lo]

    def hidden_states(self, wave: np.ndarray, *, layers: Sequence[int] | None = None) -> np.ndarray:
        """All hidden states of one utterance: ``[N]`` at :attr:`sample_rate` -> ``[L, T, H]`` float32."""
        return np.concatenate(list(self.iter_hidden_states(wave, layers=layers)), axis=1)


def load_encoder(name_or_dir: str | os.PathLike, *, device: str = "auto", dtype: str = "float32",
                 revision: str | None = None, chunk_seconds: float = 30.0,
                 overlap_seconds: float = 2.0) -> Encoder:
    """Load a frozen Hugging Face speech encoder and its feature extractor.

    Args:
        name_or_dir: hub id (e.g. ``facebook/wav2vec2-base``) or a local folder saved with ``save_pretrained``.
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: compute dtype, ``float32``, ``bfloat16`` or ``float16`` (weights are cast; outputs are float32).
        revision: hub branch, tag or commit (default ``main``).
        chunk_seconds, overlap_seconds: window and context on each side for long inputs.

    Returns:
        An :class:`Encoder` in eval mode, gradients off.

    Raises:
        OSError: the model is neither a local folder nor cached/downloadable (e.g. offline).
        ValueError: unknown dtype, or the model is not a raw-waveform encoder.
    """
    from transformers import AutoFeatureExtractor, AutoModel

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}.")
    dev = resolve_device(device)
    name = str(name_or_dir)
    kw = {"revision": revision or "main", "trust_remote_code": False}
    # A local folder or the hub cache first (no network); the hub only when neither has it and we may go online.
    attempts = [True] if Path(name).exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in {"", "0"} \
        else [True, False]
    error: Exception | None = None
    for local_only in attempts:
        try:
            extractor = AutoFeatureExtractor.from_pretrained(name, local_files_only=local_only, **kw)
            # use_safetensors=None: safetensors when the checkpoint has them, else .bin (loaded weights_only).
            model = AutoModel.from_pretrained(name, use_safetensors=None, local_files_only=local_only, **kw)
            break
        except (OSError, ValueError) as err:
            error = err
    else:
        raise OSError(
            f"cannot load encoder {name!r}: {error}\nExpected a Hugging Face model id that is cached or reachable, "
            "or a local folder saved with save_pretrained; found neither (offline?). Point at a local copy with "
            "`--encoder /path/to/wav2vec2-base`, the environment variable SER_ENCODER, or `features.encoder` "
            "in params.yaml (fetch one once with `hf download facebook/wav2vec2-base --local-dir DIR`)."
        ) from error
    if not hasattr(model.config, "conv_kernel") or "input_values" not in extractor.model_input_names:
        raise ValueError(f"{name}: expected a raw-waveform encoder of the wav2vec2 family (wav2vec2, HuBERT, "
                         f"WavLM), found model_type {model.config.model_type!r}. Pass such a checkpoint to --encoder.")
    model = model.to(dev, dtype=DTYPES[dtype]).eval().requires_grad_(False)
    for module in model.modules():  # weight norm of the positional conv: computed once, not every forward
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    local = Path(name)
    rev = _fingerprint_dir(local) if local.is_dir() else (getattr(model.config, "_commit_hash", None) or revision)
    return Encoder(model, extractor, name=name, revision=rev, device=dev, dtype=dtype,
                   chunk_seconds=chunk_seconds, overlap_seconds=overlap_seconds)

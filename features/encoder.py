"""A frozen wav2vec2-family encoder: loading, and exact hidden states from the model's own modules.

Hidden states come from the transformers model's own modules (its feature encoder, feature projection and
transformer encoder, SDPA attention where the architecture has it) and are exactly what a direct
single-utterance ``model(x, output_hidden_states=True)`` returns, also when utterances of different lengths
share a forward pass:

- A feature encoder whose first layer is a GroupNorm over time (wav2vec2-base, HuBERT-base, WavLM-base) would
  see the padding: it runs on each utterance's own samples, and the padded frames are zeros.
- A feature encoder with per-frame LayerNorms (wav2vec2-large-lv60, XLS-R, data2vec-audio) runs on the
  zero-padded batch: its convolutions are "valid", so each utterance's frames only see its own samples.
- The transformer runs on the padded batch with an attention mask. The wav2vec2, HuBERT and WavLM encoders zero
  the padded frames before their one positional convolution, which then sees what a single pass sees. The
  data2vec-audio positional embedding stacks five convolutions, so padding would leak into real frames: its
  passes only ever hold utterances of the same frame count (see :attr:`Architecture.mixed_lengths`); so do a
  HuBERT's whose positional embedding starts with a BatchNorm (``conv_pos_batch_norm``), which turns the zeroed
  padded frames into non-zero values before its convolution (:func:`architecture_of`).

The hidden states are collected as transformers collects them (the first layer's input, then every layer's
output), through forward hooks on the encoder's layers. Architectures outside :data:`ARCHITECTURES` are refused
by model type.

Precision: ``float32`` is float32 everywhere (TF32 is switched off around CUDA passes); ``bfloat16`` casts the
model; ``float16`` (CUDA) runs under autocast with float32 weights, so normalisations stay in float32.
``auto`` picks bfloat16 where a measured bfloat16 product is at least 1.5x as fast as float32 (CPUs with AMX or
AVX-512 BF16, recent GPUs), else float32.

Optional plug-in: :class:`StridedMatmulFeatureEncoder` computes the feature encoder's convolutions after the
first as time-major matrix products with the module's own weights. With ``feature_encoder="auto"`` it is timed
against the library's own modules on the running machine when the encoder is loaded and kept only when the whole
forward pass is at least 10 % faster (:func:`choose_feature_encoder`); the choice is recorded.

Inputs longer than one window are cut into windows that overlap by ``overlap_seconds`` of context on each side;
only the centre frames of each window are kept, aligned to the global frame grid, so memory stays bounded for any
duration. Windowed frames are close to, not equal to, one pass over the whole input (each window normalises with
its own statistics and attends within itself); ``docs/benchmarks.md`` gives the measured difference.

Example:
    >>> enc = load_encoder("facebook/wav2vec2-base", dtype="bfloat16")    # doctest: +SKIP
    >>> enc.hidden_states(wave).shape                                      # doctest: +SKIP
    (13, 174, 768)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import parametrize

from features.hardware import Device, DType
from pipeline.processes import cpu_cores, worker_pool

#: Compute (and storage) dtypes to their torch dtypes.
DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}
DEFAULT_ENCODER = "facebook/wav2vec2-base"


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How utterances of different lengths may share a forward pass of one model type.

    Attributes:
        model_type: the transformers ``config.model_type``.
        mixed_lengths: utterances of different frame counts may share a pass (the transformer is exact under an
            attention mask); False where padding reaches real frames (data2vec-audio's stacked positional convs,
            a positional BatchNorm).
        sdpa: the model has an SDPA attention implementation (else its eager attention is used).
        pass_plan: set where a config flag, not the model type, keeps frame counts apart (recorded in the store's
            identity, so that entries computed before this was known are not reused).
    """

    model_type: str
    mixed_lengths: bool = True
    sdpa: bool = True
    pass_plan: str | None = None


#: Every architecture the encoder accepts, with what makes its batches exact.
ARCHITECTURES = {a.model_type: a for a in (
    Architecture("wav2vec2"),
    Architecture("hubert"),
    Architecture("wavlm", sdpa=False),
    Architecture("data2vec-audio", mixed_lengths=False),
)}


def architecture_of(config) -> Architecture:
    """The :class:`Architecture` of a transformers config: its model type's, with ``mixed_lengths`` off where a
    flag lets padding reach real frames (``conv_pos_batch_norm``: an eval-mode BatchNorm before the positional
    convolution maps the zeroed padded frames to ``beta - gamma * mean / std``, which the convolution then carries
    into the neighbouring real frames of a shorter utterance)."""
    arch = ARCHITECTURES[config.model_type]
    if getattr(config, "conv_pos_batch_norm", False):
        arch = dataclasses.replace(arch, mixed_lengths=False, pass_plan="one frame count (conv_pos_batch_norm)")
    return arch


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU.

    Raises:
        ValueError: an unknown device, or ``cuda`` on a machine where torch finds no GPU.
    """
    if device == Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] not in {Device.CPU, Device.CUDA}:
        raise ValueError(f"device {device!r}: expected one of {', '.join(Device)} (or cuda:N).")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but torch finds no CUDA GPU (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'none'}); pass --device cpu or --device auto.")
    return torch.device(device)


def _product_seconds(dtype: torch.dtype, device: torch.device, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """float32 products and convolutions in full float32 on CUDA (no TF32) for the block, whatever the caller set,
    then the caller's settings back. torch >= 2.9 has per-operation precision settings (``fp32_precision``), which
    override a process-wide ``torch.backends.fp32_precision = "tf32"`` and must not be mixed with the legacy
    ``allow_tf32`` flags (reading those raises once the new ones are set); older torch has only the flags."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        before = matmul.fp32_precision, conv.fp32_precision
        try:
            matmul.fp32_precision = conv.fp32_precision = "ieee"
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = before
        return
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        matmul.allow_tf32 = before


def pick_dtype(dtype: str, device: torch.device) -> str:
    """Resolve ``auto``: bfloat16 where a bfloat16 product runs at least 1.5x as fast as float32 here, measured
    now (a fraction of a second), else float32. Other values are returned as they are (``features.extract`` keeps
    a collection's earlier choice, so that reruns do not depend on a new timing).

    Raises:
        ValueError: an unknown dtype, or float16 on CPU (too slow and inexact there; use bfloat16).
    """
    if dtype not in list(DType):
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DType)}.")
    if dtype == "float16" and device.type == "cpu":
        raise ValueError("dtype float16 on CPU: expected float32 or bfloat16 there (CPUs have no fast float16 "
                         "products); pass --dtype bfloat16 or --dtype auto.")
    if dtype != DType.AUTO:
        return dtype
    if device.type == "cuda":
        with torch.cuda.device(device):  # the GPU asked for, not the current one
            if not torch.cuda.is_bf16_supported(including_emulation=False):  # emulated bfloat16 (pre-Ampere) is slow
                return "float32"
    size = 2048 if device.type == "cuda" else 1024
    try:
        ratio = _product_seconds(torch.float32, device, size, 3) / _product_seconds(torch.bfloat16, device, size, 3)
    except RuntimeError:  # no bfloat16 product on this device
        return "float32"
    return "bfloat16" if ratio >= 1.5 else "float32"


def fingerprint_dir(folder: Path) -> str:
    """Content hash of a local model folder's config and weights (its 'revision')."""
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin"}:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return "local:" + h.hexdigest()


class StridedMatmulFeatureEncoder:
    """Optional plug-in: the feature encoder's convolutions as matrix products with the modules' own weights.

    The first convolution (one input channel) is one product of the ``[T, k]`` windows of the waveform with its
    ``[k, C]`` weight, time-major from the start. Where its norm is a GroupNorm with one group per channel (wav2vec2-
    base, HuBERT, WavLM: statistics over time), the norm is folded into that product: the convolution is linear in
    the windows, so each channel's mean and variance over time follow exactly from the windows' ``k``-dimensional
    mean and covariance, and normalising becomes a per-channel scale of the weight and a new bias, computed once per
    utterance in float64 and applied as one product of the weight split into a high and a low part in the compute
    dtype (so in bfloat16 the normalised values are rounded once, where the module rounds the convolution's output
    and then the norm's). That replaces three passes over the model's largest tensor (the norm, and the
    transposition that the module's ``[C, T]`` layout needs) by a pass over ``[T, 2k + 2]``. Other norms run as the
    layer's own modules, then the activation. From then on the features are kept time-major, ``[T, C]``: a
    convolution of kernel ``k`` and stride
    ``s`` reads, for output frame ``t``, input rows ``t*s .. t*s + k - 1``; its taps are cut into blocks of ``s``,
    and block ``b`` is one product of the strided view whose row ``t`` is the ``s * C`` contiguous values from row
    ``(t + b) * s`` with the block's weights (prepared once), so no window is copied and wav2vec2's kernel-3
    stride-2 layers take two products, its kernel-2 stride-2 ones one. Each layer's own LayerNorm (per frame) and
    activation follow. It returns what the module returns, up to the rounding of a different summation order.

    Args:
        feature_extractor: the model's ``feature_extractor`` module.

    Raises:
        ValueError: a layer after the first has a GroupNorm (over time; not expressible per frame), or the first
            layer's GroupNorm has groups of several channels.
    """

    name = "strided_matmul"
    #: Bumped whenever the plug-in's arithmetic changes (1: first layer as the module computes it; 2: its GroupNorm
    #: folded into the product), recorded with every store so that a store's numbers can be told apart.
    version = 2

    def __init__(self, feature_extractor, frame_grid: int = 1):
        self.frame_grid = frame_grid
        layers = list(feature_extractor.conv_layers)
        first = layers[0]
        (self.first_kernel,), (self.first_stride,) = first.conv.kernel_size, first.conv.stride
        self.first_weight = first.conv.weight[:, 0, :].contiguous()  # [C, k]
        self.first_bias = first.conv.bias
        self.first_norm = getattr(first, "layer_norm", None)
        self.first_activation = first.activation
        norm = self.first_norm
        if norm is not None and not isinstance(norm, torch.nn.GroupNorm | torch.nn.LayerNorm):
            raise ValueError(f"{type(norm).__name__} in the first layer: expected GroupNorm, LayerNorm or none.")
        if isinstance(norm, torch.nn.GroupNorm) and norm.num_groups != norm.num_channels:
            raise ValueError(f"GroupNorm of {norm.num_groups} groups over {norm.num_channels} channels in the first "
                             "layer: expected one group per channel (as transformers builds it).")
        self.fold_first_norm = isinstance(norm, torch.nn.GroupNorm)
        self.layers = []
        for layer in layers[1:]:
            norm = getattr(layer, "layer_norm", None)
            if norm is not None and not isinstance(norm, torch.nn.LayerNorm):
                raise ValueError(f"{type(norm).__name__} after the first convolution: expected LayerNorm or none.")
            conv = layer.conv
            (kernel,), (stride,) = conv.kernel_size, conv.stride
            blocks = []
            for first_tap in range(0, kernel, stride):
                taps = conv.weight[:, :, first_tap:first_tap + stride]  # [C_out, C_in, r]
                blocks.append((first_tap, taps.permute(2, 1, 0).reshape(-1, conv.out_channels).contiguous()))
            self.layers.append((kernel, stride, blocks, conv.bias, norm, layer.activation))

    def __call__(self, input_values: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` -> ``[B, C, T]``, one row at a time."""
        return torch.stack([self._one(row) for row in input_values])

    def _first_rows(self, frames: int) -> int:
        """Rows of the first layer's output that the later layers read, for ``frames`` real ones: more where the
        last layer's frame count is padded to a multiple of :attr:`frame_grid` (the frames computed from the extra
        rows come after the real ones and are dropped, so what those rows hold does not matter)."""
        n = frames
        for kernel, stride, *_ in self.layers:
            n = (n - kernel) // stride + 1
        rows = -(-n // self.frame_grid) * self.frame_grid
        for kernel, stride, *_ in reversed(self.layers):
            rows = (rows - 1) * stride + kernel
        return max(rows, frames)

    def _folded_first(self, windows: torch.Tensor, frames: int) -> torch.Tensor:
        """The first convolution and its per-channel GroupNorm over the first ``frames`` windows as one product:
        ``[T, k]`` -> ``[T, C]``."""
        norm, (rows, k) = self.first_norm, windows.shape
        x = windows[:frames].double()
        mean = x.mean(dim=0)
        centred = x - mean
        covariance = centred.T @ centred / frames  # [k, k]: the windows' spread over time
        weight = self.first_weight.double()  # [C, k]; a convolution bias cancels out of the normalisation
        variance = ((weight @ covariance) * weight).sum(dim=1)  # of each channel over time
        scale = torch.rsqrt(variance + norm.eps)
        shift = -scale * (weight @ mean)
        if norm.weight is not None:
            scale, shift = scale * norm.weight.double(), shift * norm.weight.double()
        if norm.bias is not None:
            shift = shift + norm.bias.double()
        folded = torch.cat([(weight * scale[:, None]).T, shift[None]])  # [k + 1, C]
        high = folded.to(windows.dtype)
        low = (folded - high.double()).to(windows.dtype)
        inputs = windows.new_empty(rows, 2 * (k + 1))  # [windows, 1, windows, 1] against [high; low]
        inputs[:, :k] = windows
        inputs[:, k] = 1
        inputs[:, k + 1:] = inputs[:, :k + 1]
        return inputs @ torch.cat([high, low])

    def _first(self, wave: torch.Tensor) -> torch.Tensor:
        """The first layer, time-major, with the rows :meth:`_first_rows` asks for: ``[N]`` -> ``[T', C]`` (the
        rows beyond the real frames are computed from zero samples; a GroupNorm's statistics exclude them)."""
        k, s = self.first_kernel, self.first_stride
        frames = (wave.shape[0] - k) // s + 1
        rows = self._first_rows(frames)
        if rows > frames:
            wave = torch.cat([wave, wave.new_zeros((rows - frames) * s)])
        windows = wave.as_strided((rows, k), (s, 1), wave.storage_offset())
        if self.fold_first_norm:
            return self.first_activation(self._folded_first(windows, frames))
        h = windows @ self.first_weight.T if self.first_bias is None else \
            torch.addmm(self.first_bias, windows, self.first_weight.T)  # [T, C]
        return self.first_activation(h if self.first_norm is None else self.first_norm(h))  # per frame

    def _one(self, wave: torch.Tensor) -> torch.Tensor:
        h = self._first(wave)
        for kernel, stride, blocks, bias, norm, activation in self.layers:
            frames, channels = (h.shape[0] - kernel) // stride + 1, h.shape[1]
            out = None
            for first_tap, weight in blocks:
                view = h.as_strided((frames, weight.shape[0]), (stride * channels, 1),
                                    h.storage_offset() + first_tap * channels)
                if out is None:
                    out = view @ weight if bias is None else torch.addmm(bias, view, weight)
                else:
                    out.addmm_(view, weight)
            h = activation(out if norm is None else norm(out))
        return h.T


#: Feature-encoder implementations: the model's own module (None) and the optional plug-ins.
FEATURE_ENCODERS: dict[str, Callable | None] = {"library": None,
                                                StridedMatmulFeatureEncoder.name: StridedMatmulFeatureEncoder}


class Encoder:
    """A loaded, frozen encoder; build it with :func:`load_encoder`.

    Attributes:
        model, feature_extractor: the transformers model and its feature extractor (input normalisation).
        name, revision: what was loaded (``revision`` is the hub commit, or ``local:<hash>`` for a folder).
        device, dtype: where and in which precision it runs (``dtype`` a key of :data:`DTYPES`).
        architecture: its :class:`Architecture`.
        sample_rate: the rate the encoder expects (Hz).
        num_layers: hidden states returned, ``L`` (transformer input + every layer: 13 for base).
        hidden_size: ``H``.  stride, receptive_field: samples per frame and samples seen by one frame.
        feature_encoder: the key of :data:`FEATURE_ENCODERS` in use; ``feature_encoder_timing`` what chose it.
        frame_grid: passes are padded to a multiple of this many frames (1: exact shapes); see
            :meth:`use_frame_grid`.
    """

    def __init__(self, model, feature_extractor, *, name: str, revision: str | None, device: torch.device,
                 dtype: str, chunk_seconds: float = 30.0, overlap_seconds: float = 2.0):
        cfg = model.config
        self.model, self.feature_extractor = model, feature_extractor
        self.name, self.revision, self.device, self.dtype = name, revision, device, dtype
        self.architecture = architecture_of(cfg)
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.num_layers = int(cfg.num_hidden_layers) + 1
        self.hidden_size = int(cfg.hidden_size)
        self.per_utterance_features = getattr(cfg, "feat_extract_norm", "layer") == "group"
        self._convs = list(zip(cfg.conv_kernel, cfg.conv_stride, strict=True))
        self.stride = math.prod(s for _, s in self._convs)
        self.receptive_field = 1
        for kernel, stride in reversed(self._convs):
            self.receptive_field = (self.receptive_field - 1) * stride + kernel
        self.window_frames = max(1, round(chunk_seconds * self.sample_rate / self.stride))
        self.context_frames = max(0, round(overlap_seconds * self.sample_rate / self.stride))
        self.chunk_seconds = self.window_frames * self.stride / self.sample_rate
        self.overlap_seconds = self.context_frames * self.stride / self.sample_rate
        self.feature_encoder = "library"
        self.feature_encoder_timing: dict = {}
        self.frame_grid = 1
        self._features: Callable = model.feature_extractor
        self._plugins: dict[str, Callable] = {}
        self._captured: list[torch.Tensor] | None = None
        layers = model.encoder.layers
        layers[0].register_forward_pre_hook(self._capture_input, with_kwargs=True)
        for layer in layers:
            layer.register_forward_hook(self._capture_output)

    # hidden states as transformers collects them: the first layer's input, then every layer's output
    def _capture_input(self, module, args, kwargs) -> None:
        if self._captured is not None:
            self._captured.append(args[0] if args else kwargs["hidden_states"])

    def _capture_output(self, module, args, output) -> None:
        if self._captured is not None:
            self._captured.append(output[0] if isinstance(output, tuple) else output)

    def use_feature_encoder(self, name: str) -> None:
        """Compute the feature encoder with ``name`` (a key of :data:`FEATURE_ENCODERS`)."""
        if name not in FEATURE_ENCODERS:
            raise ValueError(f"feature encoder {name!r}: expected one of {', '.join(FEATURE_ENCODERS)}.")
        plugin = FEATURE_ENCODERS[name]
        if plugin is not None and self.device.type != "cpu":
            raise ValueError(f"feature encoder {name!r} is a CPU plug-in; on {self.device.type} expected library.")
        if plugin is not None and name not in self._plugins:
            self._plugins[name] = plugin(self.model.feature_extractor)
        self._features = self.model.feature_extractor if plugin is None else self._plugins[name]
        self.feature_encoder = name
        self.use_frame_grid(self.frame_grid)

    @property
    def feature_encoder_version(self) -> int | None:
        """The version of the plug-in in use (None for the library's modules, whose versions are the libraries')."""
        return getattr(FEATURE_ENCODERS[self.feature_encoder], "version", None)

    def use_frame_grid(self, grid: int) -> None:
        """Pad each pass's frame count up to a multiple of ``grid`` (under the attention mask), so that passes
        repeat a few shapes and the library's per-shape kernels are reused; 1 keeps every shape exact. Only for
        architectures that may mix lengths in a pass."""
        self.frame_grid = grid if self.architecture.mixed_lengths else 1
        if hasattr(self._features, "frame_grid"):
            self._features.frame_grid = self.frame_grid

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

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        """float16: autocast over float32 weights (norms stay float32); float32 on CUDA: no TF32."""
        if self.device.type != "cuda":
            yield
            return
        with no_tf32(), torch.autocast("cuda", dtype=torch.float16, enabled=self.dtype == DType.FLOAT16):
            yield

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of the model's weights, which inputs are cast to (float32 under float16 autocast)."""
        return torch.float32 if self.dtype == DType.FLOAT16 else DTYPES[self.dtype]

    @torch.inference_mode()
    def forward(self, batch: Sequence[np.ndarray] | np.ndarray, *,
                layers: Sequence[int] | None = None) -> list[torch.Tensor]:
        """One forward pass over already-normalised inputs; every result equals the input's single pass. One pass
        at a time per encoder (its hooks collect the pass's hidden states).

        Args:
            batch: ``B`` inputs ``[N_i]`` float32, normalised with :meth:`normalise` (or a ``[B, N]`` array).
            layers: hidden-state indices to return (default all).

        Returns:
            ``B`` tensors ``[L, T_i, H]`` on :attr:`device`, in the compute dtype (views of one batch tensor).

        Raises:
            ValueError: an input shorter than one frame, or inputs of different frame counts for an architecture
                that cannot mix them.
            RuntimeError: another pass of this encoder is running (a call from another thread).
        """
        lengths = [len(w) for w in batch]
        frames = [self.num_frames(n) for n in lengths]
        if min(frames) == 0:
            raise ValueError(f"expected inputs of at least {self.receptive_field} samples (one frame), found "
                             f"{min(lengths)}; drop or pad such clips upstream.")
        if len(set(frames)) > 1 and not self.architecture.mixed_lengths:
            raise ValueError(f"{self.architecture.model_type}: expected inputs of one frame count per pass, found "
                             f"{sorted(set(frames))}; plan passes with features.extract.plan_batches.")
        width = -(-max(frames) // self.frame_grid) * self.frame_grid  # the pass's frame count
        samples = max(max(lengths), (width - 1) * self.stride + self.receptive_field)
        padded = torch.zeros(len(batch), samples if not self.per_utterance_features else max(lengths))
        for row, wave in zip(padded, batch, strict=True):
            row[:len(wave)] = torch.from_numpy(np.asarray(wave, dtype=np.float32))
        if self.device.type == "cuda":
            padded = padded.pin_memory().to(self.device, non_blocking=True)
        x = padded.to(self.input_dtype)
        with self._precision():
            if self.per_utterance_features and (len(set(lengths)) > 1 or width > max(frames)):
                features = x.new_zeros(len(batch), self.model.config.conv_dim[-1], width)
                for b, (n, t) in enumerate(zip(lengths, frames, strict=True)):
                    features[b, :, :t] = self._features(x[b:b + 1, :n])[0, :, :t]
            else:
                features = self._features(x)[:, :, :width]
            projected = self.model.feature_projection(features.transpose(1, 2))
            hidden = projected[0] if isinstance(projected, tuple) else projected
            mask = None
            if len(set(frames)) > 1 or width > max(frames):
                mask = torch.arange(width, device=x.device)[None, :] < torch.tensor(frames, device=x.device)[:, None]
            if self._captured is not None:  # the hooks collect one pass's states: two at once would mix them
                raise RuntimeError("Encoder.forward: another pass of this encoder is running (from another thread); "
                                   "expected one pass at a time per Encoder.")
            self._captured = []
            try:
                self.model.encoder(hidden, attention_mask=mask)
                states = self._captured
            finally:
                self._captured = None
        picked = torch.stack(states if layers is None else [states[i] for i in layers], dim=1)  # [B, L, T, H]
        return [picked[b, :, :t] for b, t in enumerate(frames)]

    def iter_hidden_states(self, wave: np.ndarray, *, layers: Sequence[int] | None = None,
                           normalised: bool = False) -> Iterator[torch.Tensor]:
        """Hidden states of one utterance as consecutive ``[L, t, H]`` pieces on the device (windowed when long).

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
            raise ValueError(f"expected at least {self.receptive_field} samples "
                             f"({self.receptive_field / self.sample_rate * 1000:.0f} ms) for one frame, found "
                             f"{len(x)}; drop or pad such clips upstream.")
        if len(x) <= self.max_single_samples:
            yield self.forward([x], layers=layers)[0]
            return
        for start in range(0, total, self.window_frames):
            stop = min(total, start + self.window_frames)
            lo, hi = max(0, start - self.context_frames), min(total, stop + self.context_frames)
            window = x[lo * self.stride:(hi - 1) * self.stride + self.receptive_field]
            yield self.forward([window], layers=layers)[0][:, start - lo:stop - lo]

    def hidden_states(self, wave: np.ndarray, *, layers: Sequence[int] | None = None) -> np.ndarray:
        """All hidden states of one utterance: ``[N]`` at :attr:`sample_rate` -> ``[L, T, H]`` float32."""
        return torch.cat([p.float().cpu() for p in self.iter_hidden_states(wave, layers=layers)], dim=1).numpy()


#: Frame grids timed at start-up: exact shapes (1), and passes padded to a multiple of this many frames.
FRAME_GRIDS = (1, 8)

_PROBING: dict = {}  # the encoder being timed, for the forked processes that time it


def _timed_pass(enc: Encoder, name: str, grid: int, wave: list[np.ndarray]) -> float:
    """Seconds of one forward pass over ``wave`` with feature encoder ``name`` and frame grid ``grid``."""
    enc.use_feature_encoder(name)
    enc.use_frame_grid(grid)
    start = time.perf_counter()
    out = enc.forward(wave)
    if enc.device.type == "cuda":
        torch.cuda.synchronize(enc.device)
    del out
    return time.perf_counter() - start


def _timed_round(passes: list[tuple]) -> list[float]:
    """In a forked process: :func:`_timed_pass` of each ``(name, grid, wave)`` in turn."""
    return [_timed_pass(_PROBING["enc"], *item) for item in passes]


def choose_feature_encoder(enc: Encoder, *, probe_seconds: float = 4.0, repeats: int = 2,
                           gain: float = 1.10) -> dict:
    """Time each applicable feature encoder, with exact and with grid-padded frame counts (see
    :meth:`Encoder.use_frame_grid`), inside whole forward passes on this machine, and keep the fastest only when it
    makes the pass at least ``gain`` times as fast as the library's modules on exact shapes.

    Every timed pass has an input length no pass has had before (one frame longer each time), as in an
    extraction, where utterances rarely share a length: the library's kernels are prepared per shape, and that
    preparation is part of what is timed. After one warm-up pass per candidate, each candidate's ``repeats``
    passes are interleaved with the others' and summed. On CPU the passes run on one thread, as extraction's
    processes do, and the repeats run at once in forked processes, one per core (up to ``repeats``), so that the
    timing is taken under the load extraction puts on the machine and takes a fraction of the time.

    Returns:
        ``{"chosen": name, "frame_grid": grid, "seconds": {"name/grid": seconds of its passes}, "probe_seconds":
        ...}`` (also kept as ``enc.feature_encoder_timing``).
    """
    candidates = []
    for name in FEATURE_ENCODERS:
        try:
            enc.use_feature_encoder(name)
        except ValueError:  # not applicable to this architecture or device
            continue
        grids = FRAME_GRIDS if enc.architecture.mixed_lengths else (1,)
        candidates += [(name, grid) for grid in grids]
    rng = np.random.default_rng(0)
    base = int(probe_seconds * enc.sample_rate)

    def probe(extra_frames: int) -> list[np.ndarray]:
        return [rng.standard_normal(base + extra_frames * enc.stride).astype(np.float32)]

    threads = torch.get_num_threads()
    cpu = enc.device.type == "cpu"
    if cpu:  # as extraction runs on CPU: one thread per process
        torch.set_num_threads(1)
    try:
        for c, (name, grid) in enumerate(candidates):  # warm-up, at lengths the timed passes never use
            _timed_pass(enc, name, grid, probe(-1 - c))
        rounds = [[(*candidate, probe(rep * len(candidates) + c)) for c, candidate in enumerate(candidates)]
                  for rep in range(repeats)]
        ray = sys.modules.get("ray")  # a process connected to a Ray cluster is not forked (its client threads)
        forkable = "fork" in multiprocessing.get_all_start_methods() and not (ray and ray.is_initialized())
        procs = min(repeats, cpu_cores()) if cpu and forkable else 1
        if procs > 1:  # the repeats on every core at once, as extraction's processes run (forked: warm, shared)
            _PROBING["enc"] = enc
            with worker_pool(procs, mp_context=multiprocessing.get_context("fork")) as pool:
                timings = list(pool.map(_timed_round, rounds))
        else:
            timings = [[_timed_pass(enc, *item) for item in passes] for passes in rounds]
        seconds = {candidate: sum(t[c] for t in timings) for c, candidate in enumerate(candidates)}
    finally:
        _PROBING.clear()
        torch.set_num_threads(threads)
    fastest = min(seconds, key=seconds.get)
    chosen = fastest if seconds["library", 1] >= gain * seconds[fastest] else ("library", 1)
    enc.use_feature_encoder(chosen[0])
    enc.use_frame_grid(chosen[1])
    enc.feature_encoder_timing = {"chosen": chosen[0], "frame_grid": chosen[1],
                                  "seconds": {f"{n}/{g}": round(v, 4) for (n, g), v in seconds.items()},
                                  "probe_seconds": probe_seconds}
    return enc.feature_encoder_timing


def plugin_version_note(recorded: dict, enc: Encoder) -> str | None:
    """What to tell a user whose store (``recorded``: its provenance) was computed with the plug-in ``enc`` uses
    but at another version of it, or at an unrecorded one (stores from before versions were recorded); None when
    the versions agree or no plug-in is involved. Such numbers differ from ``enc``'s at rounding level only."""
    current = enc.feature_encoder_version
    if current is None or recorded.get("feature_encoder") != enc.feature_encoder:
        return None
    found = recorded.get("feature_encoder_version")
    if found == current:
        return None
    earlier = "an unrecorded version" if found is None else f"version {found}"
    return (f"the store's features were computed by the {enc.feature_encoder} plug-in at {earlier}; this code runs "
            f"version {current}, whose frames may differ at rounding level (the dtype's precision), so results "
            "may differ in their last digits. Re-extract into a new store for numbers from one version.")


def _refuse_unsupported(name: str, config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{name}: model_type {model_type!r} is not supported; expected one of "
                         f"{', '.join(sorted(ARCHITECTURES))} (a raw-waveform encoder whose batches this tool can "
                         "keep exact). Pass a checkpoint of one of these model types to --encoder (or features.encoders in "
                         "params.yaml).")


def load_encoder(name_or_dir: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
                 revision: str | None = None, chunk_seconds: float = 30.0, overlap_seconds: float = 2.0,
                 feature_encoder: str = "auto") -> Encoder:
    """Load a frozen Hugging Face speech encoder and its feature extractor.

    Args:
        name_or_dir: hub id (e.g. ``facebook/wav2vec2-base``) or a local folder saved with ``save_pretrained``
            (its path normalised: ``./m/`` is ``m``).
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16`` (CUDA only); see :func:`pick_dtype`.
        revision: hub branch, tag or commit (default ``main``).
        chunk_seconds, overlap_seconds: window and context on each side for long inputs.
        feature_encoder: ``auto`` (timed, see :func:`choose_feature_encoder`), or a key of
            :data:`FEATURE_ENCODERS`.

    Returns:
        An :class:`Encoder` in eval mode, gradients off.

    Raises:
        OSError: the model is neither a local folder nor cached/downloadable (e.g. offline), or its files are
            damaged.
        ValueError: unknown dtype or device, or an architecture outside :data:`ARCHITECTURES`.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

    dev = resolve_device(device)
    dtype = pick_dtype(dtype, dev)
    if feature_encoder != "auto" and feature_encoder not in FEATURE_ENCODERS:
        raise ValueError(f"feature encoder {feature_encoder!r}: expected auto or one of {', '.join(FEATURE_ENCODERS)}.")
    name = str(name_or_dir)
    if Path(name).is_dir():  # "./m/", "m//" and "m" are one folder: one store identity (kept relative, as given,
        name = os.path.normpath(name)  # so that a moved or cloned project finds its stores again)
    kw = {"revision": revision or "main", "trust_remote_code": False}
    # A local folder or the hub cache first (no network); the hub only when neither has it and we may go online.
    attempts = [True] if Path(name).exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in {"", "0"} \
        else [True, False]
    error: Exception | None = None
    local = Path(name)
    hashing = ThreadPoolExecutor(1, thread_name_prefix="fingerprint")  # reads and hashes beside the load
    fingerprint = hashing.submit(fingerprint_dir, local) if local.is_dir() else None
    hashing.shutdown(wait=False)
    for local_only in attempts:
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=local_only, **kw)
            _refuse_unsupported(name, config)
            if ARCHITECTURES[config.model_type].sdpa:
                config._attn_implementation = "sdpa"
            extractor = AutoFeatureExtractor.from_pretrained(name, local_files_only=local_only, **kw)
            # use_safetensors=None: safetensors when the checkpoint has them, else .bin (loaded weights_only).
            model = AutoModel.from_pretrained(name, config=config, use_safetensors=None,
                                              local_files_only=local_only, **kw)
            break
        except ValueError as err:
            if "not supported" in str(err):
                raise
            error = err
        except (OSError, RuntimeError, SafetensorError) as err:
            error = err
    else:
        damaged = Path(name).is_dir() and error is not None and not isinstance(error, FileNotFoundError) \
            and any(Path(name).glob("*.safetensors")) | any(Path(name).glob("*.bin"))
        if damaged:
            raise OSError(f"cannot load encoder {name!r}: {error}\nExpected a complete folder saved with "
                          "save_pretrained; its weights or config look truncated or damaged. Download it again "
                          "(e.g. `hf download facebook/wav2vec2-base --local-dir DIR`).") from error
        raise OSError(
            f"cannot load encoder {name!r}: {error}\nExpected a Hugging Face model id that is cached or reachable, "
            "or a local folder saved with save_pretrained; found neither (offline?). Point at a local copy: "
            "`features.encoders` in params.yaml for `dvc repro` (or `dvc exp run -S 'features.encoders=[DIR]'`), "
            "`--encoder DIR` for `python -m features.extract` (fetch one once with "
            "`hf download facebook/wav2vec2-base --local-dir DIR`)."
        ) from error
    if "input_values" not in extractor.model_input_names:
        raise ValueError(f"{name}: expected a raw-waveform encoder (feature extractor taking input_values), found "
                         f"{type(extractor).__name__}. Pass a wav2vec2-family checkpoint to --encoder.")
    weights = torch.float32 if dtype == DType.FLOAT16 else DTYPES[dtype]  # float16: autocast over float32 weights
    model = model.to(dev, dtype=weights).eval().requires_grad_(False)
    for module in model.modules():  # the positional conv's weight norm: computed once here, not every pass
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    rev = fingerprint.result() if fingerprint else (getattr(model.config, "_commit_hash", None) or revision)
    enc = Encoder(model, extractor, name=name, revision=rev, device=dev, dtype=dtype,
                  chunk_seconds=chunk_seconds, overlap_seconds=overlap_seconds)
    if feature_encoder == "auto":
        choose_feature_encoder(enc)
    else:
        enc.use_feature_encoder(feature_encoder)
    return enc

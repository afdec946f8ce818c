"""A frozen wav2vec2-family encoder (wav2vec2, HuBERT, WavLM): loading and exact forward passes.

Exactness: wav2vec2-base's first convolution is followed by GroupNorm over the whole input, so zero padding
changes every frame. :meth:`Encoder.forward` therefore runs the convolutions of each input on its own samples,
and attention and the positional convolution on its own frames, when inputs of different lengths share a pass
(only the per-frame layers see the padded batch): every input's result equals its single pass bit for bit.
On CPU, :func:`use_fast_cpu_kernels` swaps the convolutions and linear layers for faster equivalents. Inputs longer than one
window are cut into windows that overlap by ``overlap_seconds`` of context on each side; only the centre frames of each window are kept, aligned to the
global frame grid, so memory stays bounded for any duration (windowed frames are then close to, not equal
to, a single forward pass).

Example:
    >>> enc = load_encoder("facebook/wav2vec2-base", dtype="bfloat16")    # doctest: +SKIP
    >>> enc.hidden_states(wave).shape                                      # doctest: +SKIP
    (13, 174, 768)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
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

#: Most compiled products kept per oneDNN cache (torch's ideep and oneDNN's own; each reads its variable when
#: first used, and a value already set is kept). By default each keeps 1024, one per input shape, ~0.3-0.5 MB
#: apiece: utterances of many lengths made an encoder process grow by ~0.7 GB over 300 lengths, faulting fresh
#: pages in as it went. One forward pass uses about a dozen shapes.
ONEDNN_CACHE_CAPACITY = 32
for _variable in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
    os.environ.setdefault(_variable, str(ONEDNN_CACHE_CAPACITY))
del _variable


def _onednn_ops():
    """oneDNN's fused linear (the kernel ``torch.compile`` uses on CPU) and its weight reorder, or Nones where
    this torch has them not (both are private to torch)."""
    try:
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
    except (AttributeError, RuntimeError):
        pass
    return None, None


_ONEDNN_LINEAR, _ONEDNN_PACK = _onednn_ops()


@functools.cache
def onednn_linear_supports(dtype: torch.dtype) -> bool:
    """Whether :func:`linear` runs through oneDNN for CPU tensors of ``dtype`` (not float16 on most CPUs)."""
    if _ONEDNN_LINEAR is None:
        return False
    try:
        x = torch.ones(2, 4, dtype=dtype)
        _ONEDNN_LINEAR(x, _ONEDNN_PACK(torch.ones(3, 4, dtype=dtype)), None, "gelu", [], "none")
        return True
    except RuntimeError:
        return False


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A fixed ``[out, in]`` weight for :func:`linear`: on CPU, reordered once into oneDNN's blocked layout
    (which oneDNN otherwise redoes at every product: 3-6 % of its time here, same results); elsewhere as is."""
    weight = weight.detach().contiguous()
    return _ONEDNN_PACK(weight) if weight.device.type == "cpu" and onednn_linear_supports(weight.dtype) else weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, gelu: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` (then the exact GELU), on CPU through oneDNN where it supports the dtype: on AMD
    CPUs its float32 product is 10-20 % faster than torch's default (MKL) one, and the GELU runs inside it.
    ``weight`` is ``[out, in]``, contiguous or from :func:`pack_weight`."""
    if x.device.type == "cpu" and onednn_linear_supports(x.dtype):
        return _ONEDNN_LINEAR(x, weight, bias, "gelu", [], "none") if gelu else \
            _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    out = torch.nn.functional.linear(x, weight, bias)
    return torch.nn.functional.gelu(out) if gelu else out


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


#: Most bytes of convolution windows copied at once by :class:`MatmulFeatureEncoder`. Smaller tiles are as fast
#: (186-209 ms per 4.5 s clip from 0.5 to 8 MB) and the first pass of a fresh process faults in ~25 MB fewer
#: pages than with 8 MB tiles (~14 us a page on a VM that hands free memory back to its host).
_TILE_BYTES = 1 << 20


class MatmulFeatureEncoder:
    """The convolutional feature encoder of a wav2vec2-family model as matrix products (CPU inference).

    A layer of kernel ``k`` and stride ``s`` over channels-last frames ``[N, C]`` is one product of its
    ``[T, k C]`` windows (copied from an overlapping strided view) with the kernel, through :func:`linear`
    (oneDNN, with the GELU fused where nothing comes between), so every layer runs at the speed of a dense
    matmul and no per-length convolution primitive is built. A GroupNorm with one group per channel after a
    one-channel input (wav2vec2-base's first layer) is folded into that layer's weights and bias: its
    per-channel mean and variance over time follow exactly from the mean and covariance of the input windows.

    Layers of kernel 3 and stride 2 (four of wav2vec2-base's seven, a third of its multiply-adds) compute three
    outputs ``y0..y2`` from seven input frames ``x0..x6`` with products of seven ``C_in`` blocks instead of
    nine (:meth:`_triples`): the even frames meet the outer taps ``W0, W2`` as a two-tap convolution, which
    Toom-Cook's points 0, 1, -1 and infinity compute with four products for three outputs::

        m1 = (x2 + x4) (W0 + W2) / 2          m2 = (x4 - x2) (W0 - W2) / 2
        y0 = (x0 - x4) W0 + x1 W1 + (m1 + m2)
        y1 =                x3 W1 + (m1 - m2)
        y2 = (x6 - x2) W2 + x5 W1 + (m1 + m2)

    (``m1 + m2 = x2 W2 + x4 W0``, ``m1 - m2 = x2 W0 + x4 W2``): 2/9 fewer multiply-adds in those layers, with
    errors of the windowed product's size (~5e-7 relative to a float64 convolution for wav2vec2-base's layers).
    Results equal the module's up to float rounding; :func:`load_encoder` checks that on a random input before
    using it.

    Args:
        module: the model's ``feature_extractor`` (``conv_layers`` of ``conv``, optional ``layer_norm``,
            ``activation``).

    Raises:
        NotImplementedError: a layer this class does not reproduce (padding, dilation, groups, other norms).
    """

    def __init__(self, module):
        from torch import nn
        self.layers = []
        for layer in module.conv_layers:
            conv, norm = layer.conv, getattr(layer, "layer_norm", None)
            if not isinstance(conv, nn.Conv1d) or conv.padding != (0,) or conv.dilation != (1,) or conv.groups != 1:
                raise NotImplementedError(f"{type(layer).__name__}: padded, dilated or grouped convolution")
            if not (norm is None or isinstance(norm, nn.LayerNorm) or (
                    isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels and norm.affine)):
                raise NotImplementedError(f"{type(layer).__name__}: normalisation {type(norm).__name__}")
            weight = conv.weight.detach()                                      # [out, in, k]
            (kernel,), (stride,) = conv.kernel_size, conv.stride
            folded = weight.shape[1] == 1 and isinstance(norm, nn.GroupNorm)  # kernel and norm merge per input
            matrix = weight.permute(0, 2, 1).reshape(weight.shape[0], -1)    # [out, k * in]
            exact_gelu = _is_exact_gelu(layer.activation)
            triples = (kernel, stride) == (3, 2) and weight.shape[1] > 1
            self.layers.append({
                "kernel": kernel, "stride": stride, "in": weight.shape[1], "out": weight.shape[0],
                "weight": matrix.contiguous() if folded else pack_weight(matrix),
                "bias": None if conv.bias is None else conv.bias.detach(), "norm": norm,
                "activation": layer.activation, "exact_gelu": exact_gelu,
                "triples": triples and self._triple_weights(weight),
                # the GELU runs inside the product when the layer's activation is exact GELU and no norm follows;
                # not after a one-channel input, where oneDNN's fused kernel is slower than the two steps, nor
                # after triples, whose outputs are sums of products
                "fuse_gelu": norm is None and weight.shape[1] > 1 and exact_gelu and not triples})

    @staticmethod
    def _triple_weights(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The weights of :meth:`_triples`' products (for m1, m2, y0, y1, y2) from a ``[out, in, 3]`` kernel."""
        w0, w1, w2 = (weight[:, :, j] for j in range(3))
        return tuple(pack_weight(w.to(weight.dtype)) for w in (
            (w0.double() + w2.double()) / 2, (w0.double() - w2.double()) / 2,
            torch.cat([w0, w1], dim=1), w1, torch.cat([w2, w1], dim=1)))

    @staticmethod
    def _triples(x: torch.Tensor, spec: dict) -> torch.Tensor:
        """A kernel-3, stride-2 layer's convolution (no norm, no activation) of ``x [N, C_in]`` -> ``[T, C_out]``,
        three outputs per products of seven ``C_in`` blocks (see the class); the last one or two directly."""
        c, bias = spec["in"], spec["bias"]
        w_plus, w_minus, w_first, w_odd, w_last = spec["triples"]
        frames = (x.shape[0] - 3) // 2 + 1
        triples = frames // 3
        out = x.new_empty(frames, spec["out"])
        x0, x1, x2, x3, x4, x5, x6 = (x.as_strided((triples, c), (6 * c, 1), x.storage_offset() + j * c)
                                      for j in range(7))
        rows = max(1, min(triples, _TILE_BYTES // (2 * c * x.element_size())))
        first, last, plus, minus = x.new_empty(rows, 2 * c), x.new_empty(rows, 2 * c), x.new_empty(rows, c), \
            x.new_empty(rows, c)
        y = out[:3 * triples].view(triples, 3, spec["out"])
        for i in range(0, triples, rows):
            tile = slice(i, min(i + rows, triples))
            n = tile.stop - i
            torch.add(x2[tile], x4[tile], out=plus[:n])
            torch.sub(x4[tile], x2[tile], out=minus[:n])
            m1, m2 = linear(plus[:n], w_plus, None), linear(minus[:n], w_minus, None)
            outer = m1 + m2                                          # x2 W2 + x4 W0
            inner = m1.sub_(m2)                                      # x2 W0 + x4 W2
            torch.sub(x0[tile], x4[tile], out=first[:n, :c])
            first[:n, c:] = x1[tile]
            torch.sub(x6[tile], x2[tile], out=last[:n, :c])
            last[:n, c:] = x5[tile]
            # each sum in one pass, straight into its output rows (oneDNN's fused sum is slower here)
            torch.add(linear(first[:n], w_first, bias), outer, out=y[tile, 0])
            torch.add(linear(x3[tile], w_odd, bias), inner, out=y[tile, 1])
            torch.add(linear(last[:n], w_last, bias), outer, out=y[tile, 2])
        if frames > 3 * triples:  # their windows, as the plain product takes them
            windows = x.as_strided((frames - 3 * triples, 3 * c), (2 * c, 1), x.storage_offset() + 6 * triples * c)
            out[3 * triples:] = linear(windows.contiguous(), spec["weight"], bias)
        return out

    def _layer(self, x: torch.Tensor, spec: dict) -> torch.Tensor:
        """One layer (convolution, folded GroupNorm or LayerNorm, activation) of ``x [N, C_in]`` -> ``[T, C_out]``."""
        k, s, c_in, weight, bias, norm = (spec[key] for key in ("kernel", "stride", "in", "weight", "bias", "norm"))
        x = x.contiguous()
        frames = (x.shape[0] - k) // s + 1
        windows = x.as_strided((frames, k * c_in), (s * c_in, 1), x.storage_offset())   # [T, k * C_in]
        if c_in == 1 and isinstance(norm, torch.nn.GroupNorm):  # fold the per-channel GroupNorm into the kernel
            w64, a64 = weight.double(), windows.double()                    # [out, k], [T, k]
            mean_in = a64.mean(dim=0)
            cov = a64.T @ a64 / frames - torch.outer(mean_in, mean_in)
            mean = w64 @ mean_in + (0 if bias is None else bias.double())
            var = ((w64 @ cov) * w64).sum(dim=1).clamp_min(0)
            scale = norm.weight.double() / torch.sqrt(var + norm.eps)
            weight = (w64 * scale[:, None]).to(x.dtype)
            bias = (norm.bias.double() - mean * scale).to(x.dtype)
            norm = None
        if spec["triples"]:
            out = self._triples(x, spec)
        elif windows.is_contiguous():  # stride == kernel: the windows are the frames themselves
            out = linear(windows, weight, bias, gelu=spec["fuse_gelu"])
        else:  # overlapping windows (kernel > stride), copied a tile at a time: one copy of them all would be
            # above glibc's mmap threshold, its pages faulted in afresh at every call
            rows = max(1, _TILE_BYTES // (windows.shape[1] * windows.element_size()))
            tiles = [linear(windows[i:i + rows].contiguous(), weight, bias, gelu=spec["fuse_gelu"])
                     for i in range(0, frames, rows)]
            out = tiles[0] if len(tiles) == 1 else torch.cat(tiles)
        if isinstance(norm, torch.nn.GroupNorm):
            var, mean = torch.var_mean(out, dim=0, unbiased=False)
            out = (out - mean) * (norm.weight / torch.sqrt(var + norm.eps)) + norm.bias
        elif isinstance(norm, torch.nn.LayerNorm):
            out = norm(out)
        if spec["fuse_gelu"]:
            return out
        # in place where it is the exact GELU (``out`` is this layer's own): no second array of the first layer's
        # output, the largest of the whole pass (31 MB for a 4.7 s clip)
        return torch.ops.aten.gelu_(out) if spec["exact_gelu"] else spec["activation"](out)

    def __call__(self, input_values: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` waveforms -> ``[B, C, T]`` features (a transposed view of channels-last frames)."""
        outs = []
        for wave in input_values:
            x = wave[:, None]
            for spec in self.layers:
                x = self._layer(x, spec)
            outs.append(x)
        return torch.stack(outs).transpose(1, 2)


class OneDnnLinear:
    """An ``nn.Linear`` (optionally with the exact GELU after it) through :func:`linear`, its weight packed once
    (CPU inference). A module already swapped for one lends its packed weight (no second copy)."""

    def __init__(self, module, *, gelu: bool = False):
        swapped = module.__dict__.get("forward")
        if isinstance(swapped, OneDnnLinear):
            self.weight, self.bias = swapped.weight, swapped.bias
        else:
            self.weight = pack_weight(module.weight)
            self.bias = None if module.bias is None else module.bias.detach()
        self.gelu = gelu

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, gelu=self.gelu)


class FusedFeedForward:
    """A transformer feed-forward block (``intermediate_dense``, exact GELU, ``output_dense``; dropout is the
    identity at inference) with the GELU inside the first product (:func:`linear`)."""

    def __init__(self, ff):
        self.dense = OneDnnLinear(ff.intermediate_dense, gelu=True)
        self.output = ff.output_dense

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(self.dense(hidden_states))


#: ``(samples, frames)`` of each utterance while :meth:`Encoder.forward` runs a mixed-length batch, else None.
_MIXED_BATCH: contextvars.ContextVar[tuple[list[int], list[int]] | None] = contextvars.ContextVar(
    "ser_mixed_batch", default=None)


def _mixed_batch(batch_size: int) -> tuple[list[int], list[int]] | None:
    """Each utterance's ``(samples, frames)`` when a mixed-length batch of ``batch_size`` is running, else None."""
    mixed = _MIXED_BATCH.get()
    return mixed if mixed is not None and len(mixed[0]) == batch_size else None


UNPADDED_ATTENTION = "ser_unpadded_sdpa"


def unpadded_attention(module, query, key, value, attention_mask, **kwargs):
    """Transformers' sdpa attention, run on each utterance's own frames while a mixed-length batch is encoded.

    It makes the very call a single pass makes (same values, no mask), so which utterances share a batch
    changes no bit of any result: a resumed extraction equals an uninterrupted one exactly. Outside such
    a batch it is plain sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    mixed = _mixed_batch(query.shape[0])
    if mixed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])  # [B, T, heads, D]
    for b, n in enumerate(mixed[1]):
        piece, _ = sdpa_attention_forward(module, query[b:b + 1, :, :n], key[b:b + 1, :, :n],
                                          value[b:b + 1, :, :n], None, **kwargs)
        out[b, :n] = piece[0]
    return out, None


class _PositionalConv:
    """What the positional convolution's replacements share: while a mixed-length batch is encoded, each
    utterance runs on its own frames. Subclasses set ``conv`` (the module replaced) and define ``_conv``
    (``[B, C, T]`` -> ``[B, out, T']``, channels-last)."""

    conv: torch.nn.Conv1d

    def width(self, frames: int) -> int:
        """Output frames for ``frames`` input frames."""
        (padding,), (dilation,), (stride,), (kernel,) = (self.conv.padding, self.conv.dilation, self.conv.stride,
                                                         self.conv.kernel_size)
        return (frames + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mixed = _mixed_batch(x.shape[0])
        if mixed is None:
            return self._conv(x)
        # channels-last like a single pass's output, so that later elementwise ops group values the same way
        out = x.new_zeros(x.shape[0], self.width(x.shape[2]), self.conv.out_channels).transpose(1, 2)
        for b, n in enumerate(mixed[1]):  # each utterance on its own frames, as in a single pass
            piece = self._conv(x[b:b + 1, :, :n])
            out[b, :, :piece.shape[2]] = piece[0]
        return out

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ChannelsLastConv1d(_PositionalConv):
    """A ``Conv1d`` computed as a channels-last ``conv2d`` of height 1 (CPU inference).

    The transformer's positional convolution (kernel 128, 16 groups) receives a transposed view of
    ``[B, T, C]`` frames, which is already channels-last; oneDNN's grouped kernel for that layout is about a
    third faster than the ``Conv1d`` one, with the same result up to float rounding.
    """

    def __init__(self, conv):
        self.conv = conv
        self.weight = conv.weight.detach().unsqueeze(2).contiguous(memory_format=torch.channels_last)
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.kwargs = {"stride": (1, conv.stride[0]), "padding": (0, conv.padding[0]),
                       "dilation": (1, conv.dilation[0]), "groups": conv.groups}

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x.unsqueeze(2), self.weight, self.bias, **self.kwargs).squeeze(2)


class FftConv1d(_PositionalConv):
    """A stride-1 ``Conv1d`` by FFT, block by block (overlap-save), for CPU inference; computed in float32
    whatever the model's dtype, the result cast back to it.

    For the positional convolution (kernel 128, 16 groups of 48 channels) that is a tenth of the direct
    method's multiply-adds and 2.5-5x its speed here (twice oneDNN's bfloat16 kernel's), equal to it up to
    float32 rounding (relative error ~4e-7). Blocks of ``n`` samples (the power of two >= twice the kernel)
    each yield ``n - k + 1`` outputs; the kernel's spectrum at that length is computed once (38 MB for
    wav2vec2-base). Every utterance of a batch is transformed on its own, so a batch's results equal single
    passes bit for bit.

    Raises:
        NotImplementedError: a strided or dilated convolution.
    """

    def __init__(self, conv):
        if conv.stride != (1,) or conv.dilation != (1,):
            raise NotImplementedError("FFT convolution: stride 1, no dilation")
        self.conv = conv
        weight = conv.weight.detach().float()                               # [out, in / groups, k]
        out, per_group, k = weight.shape
        self.bias = None if conv.bias is None else conv.bias.detach().float()
        self.n = 1 << (2 * k - 1).bit_length()
        self.step = self.n - k + 1
        spectrum = torch.fft.rfft(weight.flip(-1), n=self.n)               # correlation = convolution, flipped
        self.spectrum = (spectrum.reshape(conv.groups, out // conv.groups, per_group, -1)
                         .permute(3, 0, 2, 1).contiguous())                 # [freq, group, in, out]

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, T]`` -> ``[B, out, T']``, channels-last like the direct kernel's output."""
        (padding,), (k,), groups, out_channels = (self.conv.padding, self.conv.kernel_size, self.conv.groups,
                                                  self.conv.out_channels)
        width = self.width(x.shape[2])
        blocks = -(-width // self.step)
        out = x.new_empty(x.shape[0], width, out_channels)
        for b, frames in enumerate(x):                                      # [C, T]
            padded = torch.nn.functional.pad(frames.float().contiguous(),
                                             (padding, (blocks - 1) * self.step + self.n - frames.shape[1] - padding))
            spectra = torch.fft.rfft(padded.unfold(1, self.n, self.step), n=self.n)   # [C, blocks, freq]
            spectra = spectra.reshape(groups, -1, blocks, spectra.shape[-1]).permute(3, 0, 2, 1)
            product = torch.matmul(spectra, self.spectrum)                  # [freq, group, blocks, out / group]
            product = product.permute(1, 3, 2, 0).reshape(out_channels, blocks, -1)
            y = torch.fft.irfft(product, n=self.n)[..., k - 1:].reshape(out_channels, -1)[:, :width]
            out[b] = (y if self.bias is None else y + self.bias[:, None]).T        # cast to the model's dtype
        return out.transpose(1, 2)


def _swap_if_equal(module, fast, probe: torch.Tensor, tolerance: float) -> bool:
    """Replace ``module``'s forward with ``fast`` when both agree on ``probe`` (and ``fast`` runs at all);
    returns whether it did."""
    with torch.inference_mode():
        want = module(probe).float()
        try:
            got = fast(probe).float()
        except RuntimeError:  # e.g. a kernel this CPU lacks for the dtype
            return False
    if got.shape != want.shape or float((got - want).norm() / want.norm().clamp_min(1e-12)) > tolerance:
        return False
    module.forward = fast
    return True


def _is_exact_gelu(activation) -> bool:
    """Whether ``activation`` computes the exact (erf) GELU, bit for bit, on a probe."""
    if not callable(activation):
        return False
    probe = torch.linspace(-6, 6, 97)
    with torch.inference_mode():
        return torch.equal(activation(probe), torch.nn.functional.gelu(probe))


def use_fast_cpu_kernels(model, dtype: torch.dtype) -> list[str]:
    """Swap, where each reproduces the module on a random probe: the feature encoder for
    :class:`MatmulFeatureEncoder`, the positional convolution for :class:`FftConv1d` (or, should that not
    reproduce it, :class:`ChannelsLastConv1d`), the transformer's linear layers for :class:`OneDnnLinear`, and
    feed-forward blocks whose activation is the exact GELU for :class:`FusedFeedForward`. Returns what was
    swapped."""
    generator = torch.Generator().manual_seed(0)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    swapped = []
    with contextlib.suppress(NotImplementedError, AttributeError):
        module = model.feature_extractor
        probe = torch.randn(2, 16000, generator=generator).to(dtype)
        if _swap_if_equal(module, MatmulFeatureEncoder(module), probe, tolerance):
            swapped.append("feature_encoder")
    conv = getattr(getattr(getattr(model, "encoder", None), "pos_conv_embed", None), "conv", None)
    if isinstance(conv, torch.nn.Conv1d) and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple):
        probe = torch.randn(1, 100, conv.in_channels, generator=generator).to(dtype).transpose(1, 2)
        for name, fast in (("positional_conv_fft", FftConv1d), ("positional_conv", ChannelsLastConv1d)):
            with contextlib.suppress(NotImplementedError):
                if _swap_if_equal(conv, fast(conv), probe, tolerance):
                    swapped.append(name)
                    break
    if onednn_linear_supports(dtype):
        linears = 0
        for name, module in model.named_modules():
            if name.startswith(("encoder.", "feature_projection.")) and type(module) is torch.nn.Linear:
                probe = torch.randn(1, 50, module.in_features, generator=generator).to(dtype)
                linears += _swap_if_equal(module, OneDnnLinear(module), probe, tolerance)
        fused = 0
        for name, ff in model.named_modules():
            dense = getattr(ff, "intermediate_dense", None)
            if name.endswith("feed_forward") and type(dense) is torch.nn.Linear \
                    and _is_exact_gelu(getattr(ff, "intermediate_act_fn", None)):
                probe = torch.randn(1, 50, dense.in_features, generator=generator).to(dtype)
                fused += _swap_if_equal(ff, FusedFeedForward(ff), probe, tolerance)
        swapped += ["linear"] * bool(linears) + ["fused_gelu"] * bool(fused)
    return swapped


class Unpadded:
    """Wraps a feature encoder's forward so that, while a mixed-length batch runs, each row of the zero-padded
    batch is encoded from its own samples and the outputs are zero-padded to ``[B, C, T]`` (padding would
    change every frame of a GroupNorm feature encoder)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, input_values: torch.Tensor) -> torch.Tensor:
        mixed = _mixed_batch(input_values.shape[0])
        if mixed is None:
            return self.inner(input_values)
        # clone: each row starts 64-byte aligned, as a single pass's input does (a BLAS's results can depend on it)
        outs = [self.inner(input_values[b:b + 1, :n].clone())[0].transpose(0, 1) for b, n in enumerate(mixed[0])]
        padded = outs[0].new_zeros(len(outs), max(o.shape[0] for o in outs), outs[0].shape[1])
        for b, o in enumerate(outs):
            padded[b, :o.shape[0]] = o
        return padded.transpose(1, 2)


class Encoder:
    """A loaded, frozen encoder; build it with :func:`load_encoder`.

    Attributes:
        name, revision: what was loaded (``revision`` is the hub commit, or ``local:<hash>`` for a folder).
        sample_rate: the rate the encoder expects (Hz).
        num_layers: hidden states returned, ``L`` (transformer input + every layer: 13 for base).
        hidden_size: ``H``.  stride, receptive_field: samples per frame and samples seen by one frame.
        fast_kernels: modules replaced by :func:`use_fast_cpu_kernels` (empty off CPU).
    """

    def __init__(self, model, feature_extractor, *, name: str, revision: str | None, device: torch.device,
                 dtype: str, chunk_seconds: float, overlap_seconds: float, fast_kernels: Sequence[str] = ()):
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
        self.fast_kernels = list(fast_kernels)
        model.feature_extractor.forward = Unpadded(model.feature_extractor.forward)

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
    def forward(self, batch: np.ndarray | Sequence[np.ndarray], *,
                layers: Sequence[int] | None = None) -> np.ndarray | list[np.ndarray]:
        """One forward pass over already-normalised inputs.

        Inputs of equal length run as they are. Inputs of different lengths run exactly too: the per-frame
        layers multiply the zero-padded batch (larger matrices), while each input's convolutions run on its
        own samples and its positional convolution and attention on its own frames, so every result equals
        that input's single pass bit for bit.

        Args:
            batch: ``[B, N]`` float32, or a list of ``[N_i]`` arrays, normalised with :meth:`normalise`.
            layers: hidden-state indices to return (default all).

        Returns:
            ``[B, L, T, H]`` float32 for an array; for a list, a list of ``[L, T_i, H]``.
        """
        lengths = [len(w) for w in batch]
        mixed = not isinstance(batch, np.ndarray) and len(set(lengths)) > 1
        if not mixed:
            padded, mask = np.stack(batch) if not isinstance(batch, np.ndarray) else batch, None
        else:
            padded = np.zeros((len(batch), max(lengths)), dtype=np.float32)
            for row, wave in zip(padded, batch, strict=True):
                row[:len(wave)] = wave
            mask = torch.from_numpy(np.arange(padded.shape[1])[None, :] < np.array(lengths)[:, None]).long()
        x = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            mask = None if mask is None else mask.to(self.device)
        x = x.to(DTYPES[self.dtype])
        token = _MIXED_BATCH.set((lengths, [self.num_frames(n) for n in lengths]) if mixed else None)
        try:
            states = self.model(x, attention_mask=mask, output_hidden_states=True).hidden_states
        finally:
            _MIXED_BATCH.reset(token)
        picked = states if layers is None else [states[i] for i in layers]
        if isinstance(batch, np.ndarray) or self.device.type == "cuda":  # one copy to the host
            out = torch.stack(picked, dim=1).float().cpu().numpy()
            return out if isinstance(batch, np.ndarray) else \
                [o[:, :self.num_frames(n)] for o, n in zip(out, lengths, strict=True)]
        # on CPU one utterance at a time, its own frames only: each layer copied (and cast to float32) once, no
        # padded frames; and no whole-batch array, which from 4 x 4.2 s up is above glibc's mmap threshold (32 MB)
        # and, in a process that features.extract.tune_malloc has not tuned, faulted in afresh at every pass
        outs = []
        for b, n in enumerate(lengths):
            out = torch.empty(len(picked), self.num_frames(n), self.hidden_size)
            for layer, s in zip(out, picked, strict=True):
                layer.copy_(s[b, :layer.shape[0]])
            outs.append(out.numpy())
        return outs

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
    fast_kernels = use_fast_cpu_kernels(model, DTYPES[dtype]) if dev.type == "cpu" else []
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(UNPADDED_ATTENTION, unpadded_attention)
        AttentionMaskInterface.register(UNPADDED_ATTENTION, sdpa_mask)
        model.set_attn_implementation(UNPADDED_ATTENTION)
    local = Path(name)
    rev = _fingerprint_dir(local) if local.is_dir() else (getattr(model.config, "_commit_hash", None) or revision)
    return Encoder(model, extractor, name=name, revision=rev, device=dev, dtype=dtype,
                   chunk_seconds=chunk_seconds, overlap_seconds=overlap_seconds, fast_kernels=fast_kernels)

"""The frozen encoder: loading, exact forward, windowing of long inputs, loading errors."""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest
import torch

from features.encoder import MatmulFeatureEncoder, load_encoder, onednn_linear_supports


@pytest.fixture(scope="module")
def enc(tiny_encoder_dir):
    return load_encoder(tiny_encoder_dir, device="cpu")


def _wave(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)


def test_loads_by_path(enc, tiny_encoder_dir):
    assert (enc.sample_rate, enc.num_layers, enc.hidden_size, enc.stride) == (16000, 4, 32, 320)
    assert enc.revision.startswith("local:") and enc.device.type == "cpu"
    assert not any(p.requires_grad for p in enc.model.parameters())


@pytest.mark.parametrize("seconds", [0.3, 1.7])
def test_hidden_states_equal_direct_forward(enc, direct_forward, seconds):
    wave = _wave(seconds)
    got = enc.hidden_states(wave)
    want = direct_forward(wave)
    assert got.dtype == np.float32 and got.shape == want.shape == (4, enc.num_frames(len(wave)), 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layer_selection(enc):
    wave = _wave(0.5)
    np.testing.assert_array_equal(enc.hidden_states(wave, layers=[0, 3]), enc.hidden_states(wave)[[0, 3]])


def test_long_input_is_windowed_in_bounded_memory(tiny_encoder_dir, direct_forward, monkeypatch):
    enc = load_encoder(tiny_encoder_dir, device="cpu", chunk_seconds=1.0, overlap_seconds=0.4)
    seen = []
    forward = enc.forward
    monkeypatch.setattr(enc, "forward", lambda batch, **kw: seen.append(batch.shape[-1]) or forward(batch, **kw))
    wave = _wave(7.3)
    got = enc.hidden_states(wave)
    want = direct_forward(wave)
    assert got.shape == want.shape                                   # same frame grid as one pass
    assert len(seen) == 8 and max(seen) <= enc.max_single_samples     # never more than one window
    assert enc.max_single_samples < 2.0 * 16000
    # windows see only 0.4 s of context and their own GroupNorm statistics: close, not equal
    corr = np.corrcoef(got[-1].ravel(), want[-1].ravel())[0, 1]
    assert corr > 0.9


def test_too_short_input(enc):
    with pytest.raises(ValueError, match="at least 165 samples"):
        enc.hidden_states(np.zeros(100, np.float32))


# float16: oneDNN's CPU linear lacks it on most CPUs, so those layers keep torch's own product; nothing fails
@pytest.mark.parametrize("dtype, lowest_cosine", [("bfloat16", 0.98), ("float16", 0.99)])
def test_reduced_precision_runs_and_returns_float32(tiny_encoder_dir, enc, dtype, lowest_cosine):
    low = load_encoder(tiny_encoder_dir, device="cpu", dtype=dtype)
    assert low.fast_kernels == ["feature_encoder", "positional_conv_fft", *_onednn(dtype)]
    wave = _wave(1.0)
    got, ref = low.hidden_states(wave), enc.hidden_states(wave)
    assert got.dtype == np.float32 and got.shape == ref.shape
    cos = (got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref)
    assert lowest_cosine < cos < 1.0  # below 1: it really computed in the lower precision


def test_linear_weights_are_packed_once_and_shared_by_the_fused_feed_forward(enc):
    from features.encoder import FusedFeedForward, OneDnnLinear, linear, pack_weight
    if not onednn_linear_supports(torch.float32):
        pytest.skip("no oneDNN linear in this torch")
    ff = enc.model.encoder.layers[0].feed_forward
    fused, dense = ff.forward, ff.intermediate_dense.forward
    assert isinstance(fused, FusedFeedForward) and isinstance(dense, OneDnnLinear)
    assert dense.weight.is_mkldnn and fused.dense.weight is dense.weight  # one packed copy, not two
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 32), torch.randn(64, 32), torch.randn(64)
    np.testing.assert_allclose(linear(x, pack_weight(w), b), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # rows are computed alike in any batch (what makes mixed-length passes exact)
    assert torch.equal(linear(x, pack_weight(w), b)[5:25], linear(x[5:25].clone(), pack_weight(w), b))


def test_unknown_dtype(tiny_encoder_dir):
    with pytest.raises(ValueError, match="expected one of"):
        load_encoder(tiny_encoder_dir, dtype="int8")


def test_offline_without_model_says_how_to_point_at_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as err:
        load_encoder("ser-tests/no-such-encoder", device="cpu")
    message = str(err.value)
    assert "--encoder" in message and "SER_ENCODER" in message and "params.yaml" in message


def test_cuda_requested_without_gpu(tiny_encoder_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="--device cpu"):
        load_encoder(tiny_encoder_dir, device="cuda")


def _onednn(dtype: str = "float32") -> list[str]:
    return ["linear", "fused_gelu"] if onednn_linear_supports(getattr(torch, dtype)) else []


ONEDNN = _onednn()


def test_fast_cpu_kernels_replace_the_convolutions(enc, direct_forward):
    # the tiny model has wav2vec2-base's structure: GroupNorm first layer, grouped positional convolution
    assert enc.fast_kernels == ["feature_encoder", "positional_conv_fft", *ONEDNN]
    wave = _wave(1.3, seed=3)
    np.testing.assert_allclose(enc.hidden_states(wave), direct_forward(wave), rtol=1e-5, atol=1e-5)


def test_convolution_windows_copied_in_tiles(enc, direct_forward, monkeypatch):
    import features.encoder
    monkeypatch.setattr(features.encoder, "_TILE_BYTES", 4096)  # many tiles per layer, a ragged last one
    wave = _wave(1.3, seed=6)
    np.testing.assert_allclose(enc.hidden_states(wave), direct_forward(wave), rtol=1e-5, atol=1e-5)


def test_fast_kernels_on_a_layer_norm_encoder_with_conv_bias(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(1)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2),
                            feat_extract_norm="layer", conv_bias=True, num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4, do_stable_layer_norm=True)
    model = Wav2Vec2Model(config).eval()
    model.save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(tmp_path)
    enc = load_encoder(tmp_path, device="cpu")
    assert enc.fast_kernels == ["feature_encoder", "positional_conv_fft", *ONEDNN]
    wave = enc.normalise(_wave(0.9, seed=4))
    with torch.no_grad():
        want = torch.stack(model(torch.from_numpy(wave)[None], output_hidden_states=True).hidden_states, 1)[0]
    np.testing.assert_allclose(enc.hidden_states(wave), want.numpy(), rtol=1e-5, atol=1e-5)


def test_an_approximate_gelu_is_not_fused(tmp_path):
    # gelu_new (tanh approximation) differs from the exact GELU by ~1e-4: close enough to pass a tolerance
    # check on a probe, so the swap must look at the activation itself, in the transformer and the convolutions
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(2)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                            hidden_act="gelu_new", feat_extract_activation="gelu_new")
    model = Wav2Vec2Model(config).eval()
    model.save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(tmp_path)
    enc = load_encoder(tmp_path, device="cpu")
    assert "fused_gelu" not in enc.fast_kernels
    convs = enc.model.feature_extractor.forward.inner
    assert isinstance(convs, MatmulFeatureEncoder) and not any(spec["fuse_gelu"] for spec in convs.layers)
    wave = enc.normalise(_wave(0.9, seed=5))
    with torch.no_grad():
        want = torch.stack(model(torch.from_numpy(wave)[None], output_hidden_states=True).hidden_states, 1)[0]
    np.testing.assert_allclose(enc.hidden_states(wave), want.numpy(), rtol=1e-5, atol=1e-5)


def test_mixed_lengths_in_one_pass_equal_single_passes_bit_for_bit(enc):
    waves = [enc.normalise(_wave(s, seed=i)) for i, s in enumerate([1.31, 1.2, 1.27, 0.5])]
    together = enc.forward(waves)
    assert [t.shape[1] for t in together] == [enc.num_frames(len(w)) for w in waves]
    for wave, frames in zip(waves, together, strict=True):
        np.testing.assert_array_equal(frames, enc.forward([wave])[0])
    np.testing.assert_array_equal(enc.forward(waves[1:3])[1], together[2])  # whatever its batch-mates


@pytest.mark.parametrize("kernel, padding, stride, groups", [(128, 64, 1, 16), (5, 2, 1, 1), (7, 3, 2, 1), (4, 0, 3, 2)])
@pytest.mark.parametrize("fft", [False, True])
def test_channels_last_conv_matches_conv1d_at_every_length(kernel, padding, stride, groups, fft):
    from features.encoder import ChannelsLastConv1d, FftConv1d

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(32, 32, kernel, padding=padding, stride=stride, groups=groups)
    if fft and stride > 1:
        with pytest.raises(NotImplementedError):
            FftConv1d(conv)
        return
    fast = FftConv1d(conv) if fft else ChannelsLastConv1d(conv)
    # below, at and above a length bucket; for the FFT, one block or several, the last one ragged
    for frames in (1, 5, 31, 32, 33, 70, 301):
        if frames + 2 * padding < kernel:
            continue
        x = torch.randn(2, frames, 32).transpose(1, 2)  # the channels-last view the encoder passes
        with torch.no_grad():
            want, got = conv(x), fast(x)
        assert got.shape == want.shape and got.transpose(1, 2).is_contiguous()  # channels-last, as conv2d's
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fft_convolution_of_a_batch_equals_single_passes_bit_for_bit():
    from features.encoder import FftConv1d

    torch.manual_seed(0)
    fast = FftConv1d(torch.nn.Conv1d(32, 32, 16, padding=8, groups=4))
    x = torch.randn(3, 90, 32).transpose(1, 2)
    together = fast(x)
    for b in range(3):
        assert torch.equal(together[b], fast(x[b:b + 1])[0])


def test_fft_convolution_of_a_bfloat16_model_computes_in_float32_and_returns_bfloat16():
    from features.encoder import FftConv1d

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(32, 32, 16, padding=8, groups=4).to(torch.bfloat16)
    x = torch.randn(1, 50, 32).to(torch.bfloat16).transpose(1, 2)
    got = FftConv1d(conv)(x)
    with torch.no_grad():
        want = torch.nn.functional.conv1d(x.float(), conv.weight.float(), conv.bias.float(), padding=8, groups=4)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)  # bfloat16 output rounding only


@pytest.mark.parametrize("tile_bytes", [8 << 20, 4096])
def test_kernel3_stride2_layers_compute_three_outputs_from_seven_products(tile_bytes, monkeypatch):
    from torch import nn

    import features.encoder
    monkeypatch.setattr(features.encoder, "_TILE_BYTES", tile_bytes)  # one tile, or many with a ragged last one
    torch.manual_seed(0)
    layer = nn.Module()
    layer.conv, layer.activation = nn.Conv1d(24, 20, 3, stride=2, bias=True), nn.GELU()
    stack = nn.Module()
    stack.conv_layers = [layer]
    convs = MatmulFeatureEncoder(stack)
    assert convs.layers[0]["triples"] and not convs.layers[0]["fuse_gelu"]
    for frames in (1, 2, 3, 4, 5, 9, 301):  # no triple, one, one or two last outputs directly, many tiles
        x = torch.randn(2 * frames + 1 + frames % 2, 24)
        with torch.no_grad():
            want = layer.activation(layer.conv(x.T[None]))[0].T
            got = convs._layer(x, convs.layers[0])
        assert got.shape == want.shape == (frames, 20)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # as accurate as the plain product of the windows, against a float64 convolution
    x, spec = torch.randn(1001, 24), convs.layers[0]
    with torch.no_grad():
        exact = torch.nn.functional.conv1d(x.double().T[None], layer.conv.weight.double(),
                                           layer.conv.bias.double(), stride=2)[0].T
        plain = features.encoder.linear(x.as_strided((500, 72), (48, 1)).contiguous(), spec["weight"], spec["bias"])
        error = lambda y: float((y.double() - exact).norm() / exact.norm())  # noqa: E731
        assert error(convs._triples(x, spec)) < max(2 * error(plain), 1e-7)


def test_base_convolution_stack_through_triples_equals_the_model(tmp_path):
    # wav2vec2-base's kernels and strides (four kernel-3 stride-2 layers), narrow
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(3)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(24,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    model = Wav2Vec2Model(config).eval()
    model.save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(tmp_path)
    enc = load_encoder(tmp_path, device="cpu")
    assert [bool(spec["triples"]) for spec in enc.model.feature_extractor.forward.inner.layers] == \
        [False, True, True, True, True, False, False]
    waves = [enc.normalise(_wave(n / 16000, seed=n)) for n in (400, 1050, 16000, 16321, 23456)]
    for wave in waves:
        with torch.no_grad():
            want = torch.stack(model(torch.from_numpy(wave)[None], output_hidden_states=True).hidden_states, 1)[0]
        np.testing.assert_allclose(enc.hidden_states(wave), want.numpy(), rtol=1e-5, atol=1e-5)
    together = enc.forward(waves[2:])  # mixed lengths: still each utterance's single pass, bit for bit
    for wave, frames in zip(waves[2:], together, strict=True):
        np.testing.assert_array_equal(frames, enc.forward([wave])[0])


_CACHE_PROBE = """
import ctypes, torch
from features.encoder import linear, pack_weight
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
torch.set_num_threads(1)
weight, x = pack_weight(torch.randn(256, 256)), torch.randn(400, 256)
linear(x[:10], weight, None)
before = libc.mallinfo2().uordblks
for rows in range(100, 400):  # 300 input shapes, as utterances of 300 lengths give
    linear(x[:rows], weight, None)
print((libc.mallinfo2().uordblks - before) / 2**20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not onednn_linear_supports(torch.float32),
                    reason="reads glibc's malloc statistics; products through oneDNN")
def test_onednn_caches_stay_small_over_many_input_shapes(run_probe):
    variables = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")

    def growth_mb(capacity: str | None) -> float:
        env = {k: v for k, v in os.environ.items() if k not in variables}  # this process's import set them
        env.update({k: capacity for k in variables} if capacity else {})
        return run_probe(_CACHE_PROBE, env=env)

    assert growth_mb(None) < 40  # as features.encoder sets them on import
    assert growth_mb("1024") > 100  # torch's defaults: a compiled product kept for each of the 300 shapes

"""The encoder: exact hidden states for every accepted architecture, precision, plug-in choice, refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import AutoModel

from features import encoder as encoder_mod
from features.encoder import (
    ARCHITECTURES,
    FEATURE_ENCODERS,
    FRAME_GRIDS,
    choose_feature_encoder,
    load_encoder,
    pick_dtype,
)
from pipeline.processes import cpu_cores

ARCHS = ["wav2vec2-base", "wav2vec2-large-lv60", "hubert-base", "wavlm-base-plus", "data2vec-audio-base"]


def _waves(enc, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [enc.normalise(rng.standard_normal(n).astype(np.float32)) for n in lengths]


def _direct(model_dir, wave, dtype=torch.float32):
    """What transformers returns for one utterance on its own, no padding: ``[L, T, H]`` float32."""
    model = AutoModel.from_pretrained(model_dir).to(dtype).eval()
    with torch.no_grad():
        states = model(torch.from_numpy(wave)[None].to(dtype), output_hidden_states=True).hidden_states
    return torch.stack(states, 1)[0].float()


def _worst_relative_error(got, want):
    """The largest over layers of max |got - want| / max |want|."""
    return max(((g.float() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want, strict=True))


def _worst_relative_rms(got, want):
    """The largest over layers of ||got - want|| / ||want|| (the error's size, not one element's luck)."""
    return max(((g.float() - w).norm() / w.norm()).item() for g, w in zip(got, want, strict=True))


def _lengths(enc):
    """A mixed batch: different frame counts where the architecture allows it, else one frame count."""
    return [16000, 12345, 12445, 7000] if enc.architecture.mixed_lengths else [16000, 16010, 16030]


@pytest.mark.parametrize("grid", FRAME_GRIDS)
@pytest.mark.parametrize("feature_encoder", list(FEATURE_ENCODERS))
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_length_batch_equals_single_utterance_forward(tiny_model_dir, arch, feature_encoder, grid):
    model_dir = tiny_model_dir(arch)
    enc = load_encoder(model_dir, device="cpu", dtype="float32", feature_encoder=feature_encoder)
    enc.use_frame_grid(grid)  # padded frame counts are masked: the same states
    waves = _waves(enc, _lengths(enc))
    for wave, got in zip(waves, enc.forward(waves), strict=True):
        want = _direct(model_dir, wave)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert _worst_relative_error(got, want) < 1e-5


@pytest.mark.parametrize("grid", FRAME_GRIDS)
@pytest.mark.parametrize("feature_encoder", list(FEATURE_ENCODERS))
@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_error_within_one_and_a_half_times_transformers_own(tiny_model_dir, arch, feature_encoder, grid):
    model_dir = tiny_model_dir(arch)
    enc = load_encoder(model_dir, device="cpu", dtype="bfloat16", feature_encoder=feature_encoder)
    enc.use_frame_grid(grid)
    waves = _waves(enc, _lengths(enc), seed=1)
    for wave, got in zip(waves, enc.forward(waves), strict=True):
        exact = _direct(model_dir, wave)
        theirs = _worst_relative_rms(_direct(model_dir, wave, torch.bfloat16), exact)
        assert got.dtype == torch.bfloat16
        assert _worst_relative_rms(got, exact) <= 1.5 * theirs


def test_data2vec_never_mixes_frame_counts_because_padding_would_reach_real_frames(tiny_model_dir):
    model_dir = tiny_model_dir("data2vec-audio-base")
    enc = load_encoder(model_dir, device="cpu", dtype="float32")
    waves = _waves(enc, [16000, 9000])
    with pytest.raises(ValueError, match="one frame count per pass"):
        enc.forward(waves)
    # why: its five stacked positional convolutions carry the padding into the shorter utterance's frames
    enc.architecture = encoder_mod.Architecture("data2vec-audio", mixed_lengths=True)
    assert _worst_relative_error(enc.forward(waves)[1], _direct(model_dir, waves[1])) > 1e-2


def test_hubert_with_a_positional_batch_norm_never_mixes_frame_counts(tiny_model_dir, tmp_path, make_manifest,
                                                                     synth_files):
    """``conv_pos_batch_norm``: the eval-mode BatchNorm maps zeroed padding to non-zero values, which the positional
    convolution carries into real frames; such a model is planned like data2vec-audio, one frame count per pass."""
    import transformers

    model = AutoModel.from_pretrained(tiny_model_dir("hubert-base", conv_pos_batch_norm=True))
    bn = model.encoder.pos_conv_embed.batch_norm
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # trained statistics: padding no longer stays zero
        for tensor in (bn.running_mean, bn.bias):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) + 0.5)
    model_dir = tmp_path / "hubert-posbn"
    model.save_pretrained(model_dir)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(model_dir)
    enc = load_encoder(model_dir, device="cpu", dtype="float32", feature_encoder="library")
    assert not enc.architecture.mixed_lengths and enc.frame_grid == 1
    assert enc.architecture.pass_plan  # in the store's identity: entries planned before this fix are not reused
    enc.use_frame_grid(8)
    assert enc.frame_grid == 1
    waves = _waves(enc, [16000, 16010, 16030])
    for wave, got in zip(waves, enc.forward(waves), strict=True):
        assert _worst_relative_error(got, _direct(model_dir, wave)) < 1e-5
    mixed = _waves(enc, [16000, 9000])
    with pytest.raises(ValueError, match="one frame count per pass"):
        enc.forward(mixed)
    enc.architecture = encoder_mod.Architecture("hubert", mixed_lengths=True)  # why it is refused
    assert _worst_relative_error(enc.forward(mixed)[1], _direct(model_dir, mixed[1])) > 1e-2
    from features.extract import extract
    from features.store import FeatureStore
    out = tmp_path / "f"  # in the store's identity: entries planned before the fix (mixed passes) are not reused
    extract([make_manifest(synth_files[:2])], out, encoder=str(model_dir), device="cpu", dtype="float32")
    with FeatureStore(out) as fs:
        assert "conv_pos_batch_norm" in fs.attrs["pass_plan"]


def test_layer_selection_and_shapes(tiny_model_dir):
    enc = load_encoder(tiny_model_dir("wav2vec2-base"), device="cpu", dtype="float32")
    wave = _waves(enc, [8000])[0]
    full = enc.forward([wave])[0]
    picked = enc.forward([wave], layers=[2, 0])[0]
    assert full.shape == (enc.num_layers, enc.num_frames(8000), enc.hidden_size)
    assert torch.equal(picked[0], full[2]) and torch.equal(picked[1], full[0])


def test_long_input_is_windowed_in_bounded_passes(tiny_model_dir, monkeypatch):
    model_dir = tiny_model_dir("wav2vec2-base")
    enc = load_encoder(model_dir, device="cpu", dtype="float32", chunk_seconds=1.0, overlap_seconds=0.2)
    wave = np.random.default_rng(3).standard_normal(5 * 16000 + 123).astype(np.float32)
    seen = []
    original = enc.forward
    monkeypatch.setattr(enc, "forward", lambda batch, **kw: seen.append(len(batch[0])) or original(batch, **kw))
    pieces = list(enc.iter_hidden_states(wave))
    assert len(pieces) == 5 and max(seen) <= enc.max_single_samples
    whole = _direct(model_dir, enc.normalise(wave))
    windowed = torch.cat(pieces, dim=1)
    assert windowed.shape == whole.shape
    # a window's centre frame sees 0.2 s of context on each side: close to, not equal to, the whole pass
    assert torch.allclose(windowed[0, :10], whole[0, :10], atol=0.5)


def test_a_pass_started_while_another_runs_is_refused_not_mixed(tiny_model_dir):
    enc = load_encoder(tiny_model_dir("wav2vec2-base"), device="cpu", dtype="float32", feature_encoder="library")
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    started = []
    layer = enc.model.encoder.layers[0]

    def nested(module, args, output):  # a second pass from inside the first, as a second thread would start one
        if not started:
            started.append(True)
            with pytest.raises(RuntimeError, match="another pass of this encoder is running"):
                enc.forward([wave])

    handle = layer.register_forward_hook(nested)
    try:
        [states] = enc.forward([wave])
    finally:
        handle.remove()
    np.testing.assert_array_equal(states.numpy(), enc.forward([wave])[0].numpy())  # the first pass was not disturbed
    assert started


@pytest.mark.parametrize("feature_encoder", list(FEATURE_ENCODERS))
def test_too_short_input_is_refused(tiny_model_dir, feature_encoder):
    enc = load_encoder(tiny_model_dir("wav2vec2-base"), device="cpu", dtype="float32", feature_encoder=feature_encoder)
    with pytest.raises(ValueError, match="expected at least 400 samples"):
        list(enc.iter_hidden_states(np.zeros(100, np.float32)))
    with pytest.raises(ValueError, match="expected inputs of at least 400 samples .* found 2;"):
        enc.forward([np.zeros(16000, np.float32), np.zeros(2, np.float32)])


def test_plugin_and_grid_kept_only_when_they_beat_the_library_by_the_margin(tiny_model_dir, monkeypatch, tmp_path):
    enc = load_encoder(tiny_model_dir("wav2vec2-base"), device="cpu", dtype="float32", feature_encoder="library")
    original, log = enc.forward, tmp_path / "passes"

    def spy(batch, **kw):  # the timed passes may run in forked processes: each appends "pid length" to a file
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {len(batch[0])}\n")
        return original(batch, **kw)

    monkeypatch.setattr(enc, "forward", spy)
    timing = choose_feature_encoder(enc, probe_seconds=1.0, repeats=2, gain=1e9)  # nothing can be that fast
    assert (timing["chosen"], timing["frame_grid"]) == ("library", 1) == (enc.feature_encoder, enc.frame_grid)
    assert set(timing["seconds"]) == {f"{n}/{g}" for n in FEATURE_ENCODERS for g in FRAME_GRIDS}
    assert all(t > 0 for t in timing["seconds"].values())
    passes = [line.split() for line in log.read_text().splitlines()]
    lengths = [int(n) for _, n in passes]
    assert len(lengths) == 3 * len(timing["seconds"]) == len(set(lengths))  # every pass a new input length
    warm_up, timed = passes[:len(timing["seconds"])], passes[len(timing["seconds"]):]
    assert {pid for pid, _ in warm_up} == {str(os.getpid())}
    forked = min(2, cpu_cores()) if cpu_cores() > 1 else 0  # the repeats, one per core
    assert len({pid for pid, _ in timed} - {str(os.getpid())}) == forked
    timing = choose_feature_encoder(enc, probe_seconds=1.0, repeats=1, gain=0.0)  # any gain will do
    fastest = min(timing["seconds"], key=timing["seconds"].get)
    assert fastest == f"{timing['chosen']}/{timing['frame_grid']}" == f"{enc.feature_encoder}/{enc.frame_grid}"


def test_data2vec_is_never_timed_or_run_on_padded_frame_counts(tiny_model_dir):
    enc = load_encoder(tiny_model_dir("data2vec-audio-base"), device="cpu", dtype="float32")
    assert enc.frame_grid == 1 and all(k.endswith("/1") for k in enc.feature_encoder_timing["seconds"])
    enc.use_frame_grid(8)
    assert enc.frame_grid == 1


def test_plugin_refused_where_a_norm_cannot_be_computed_per_frame_or_folded():
    conv = torch.nn.Conv1d(4, 4, 3, stride=2)
    layer = torch.nn.Module()
    layer.conv, layer.layer_norm, layer.activation = conv, torch.nn.GroupNorm(4, 4), torch.nn.GELU()
    first = torch.nn.Module()
    first.conv, first.activation = torch.nn.Conv1d(1, 4, 10, stride=5), torch.nn.GELU()
    fe = torch.nn.Module()
    fe.conv_layers = torch.nn.ModuleList([first, layer])
    with pytest.raises(ValueError, match="GroupNorm after the first convolution"):
        encoder_mod.StridedMatmulFeatureEncoder(fe)
    fe.conv_layers = torch.nn.ModuleList([first])
    first.layer_norm = torch.nn.GroupNorm(2, 4)  # statistics over pairs of channels: not folded into the product
    with pytest.raises(ValueError, match="GroupNorm of 2 groups over 4 channels in the first layer"):
        encoder_mod.StridedMatmulFeatureEncoder(fe)
    first.layer_norm = torch.nn.BatchNorm1d(4)
    with pytest.raises(ValueError, match="BatchNorm1d in the first layer"):
        encoder_mod.StridedMatmulFeatureEncoder(fe)
    first.layer_norm = torch.nn.GroupNorm(4, 4)
    assert encoder_mod.StridedMatmulFeatureEncoder(fe).fold_first_norm


def test_unsupported_architecture_is_refused_by_model_type(tmp_path):
    from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerModel, Wav2Vec2FeatureExtractor

    config = Wav2Vec2ConformerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, conv_dim=(8,), conv_kernel=(10,), conv_stride=(5,),
                                     num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=1)
    Wav2Vec2ConformerModel(config).save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'wav2vec2-conformer' is not supported; expected one of"):
        load_encoder(tmp_path, device="cpu")
    assert "wav2vec2-conformer" not in ARCHITECTURES


def test_truncated_weights_give_a_clear_error(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir("wav2vec2-base"), tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match="truncated or damaged"):
        load_encoder(tmp_path / "model", device="cpu")


def test_offline_without_model_says_how_to_point_at_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(OSError, match="features.encoders"):
        load_encoder("nobody/no-such-model", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_gpu():
    with pytest.raises(ValueError, match="finds no CUDA GPU"):
        load_encoder("unused", device="cuda")


def test_dtypes_resolve_and_float16_is_refused_on_cpu():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) in {"float32", "bfloat16"}
    assert pick_dtype("bfloat16", cpu) == "bfloat16"
    with pytest.raises(ValueError, match="float16 on CPU"):
        pick_dtype("float16", cpu)
    with pytest.raises(ValueError, match="expected one of auto"):
        pick_dtype("float8", cpu)


def test_out_of_memory_pass_is_split_down_to_single_rows(tiny_model_dir, monkeypatch):
    from features.extract import forward_split

    enc = load_encoder(tiny_model_dir("wav2vec2-base"), device="cpu", dtype="float32")
    waves = _waves(enc, [8000, 7000, 6000, 5000, 4000])
    whole = enc.forward(waves)
    original, sizes = enc.forward, []

    def small_device(batch, **kw):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("pretend the device is full")
        if len(batch) > 1:  # cuBLAS's allocation failure reaches Python as a plain RuntimeError
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return original(batch, **kw)

    monkeypatch.setattr(enc, "forward", small_device)
    split = forward_split(enc, waves, None)
    assert sizes.count(1) == 5
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(split, whole, strict=True))
    monkeypatch.setattr(enc, "forward", lambda batch, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("full")))
    with pytest.raises(OSError, match="smaller --chunk-seconds"):
        forward_split(enc, waves[:1], None)
    monkeypatch.setattr(enc, "forward", lambda batch, **kw: (_ for _ in ()).throw(RuntimeError("a shape mismatch")))
    with pytest.raises(RuntimeError, match="a shape mismatch"):  # another error is not split and retried
        forward_split(enc, waves, None)


def test_no_tf32_turns_tf32_off_for_products_and_convolutions_then_restores_the_callers_choice():
    from features.encoder import no_tf32

    backends, before = torch.backends, torch.backends.fp32_precision
    try:
        backends.fp32_precision = "tf32"  # a program that allows TF32 everywhere, with torch's newer setting
        with no_tf32():
            assert backends.cuda.matmul.fp32_precision == "ieee" and backends.cudnn.conv.fp32_precision == "ieee"
        assert backends.cuda.matmul.fp32_precision == "tf32" and backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        backends.fp32_precision = before

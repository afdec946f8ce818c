import numpy as np
import pytest
import soundfile as sf

from pipeline.audio import AudioError, audio_info, check_samples, load_audio, stream_audio

RATES = [16000, 22050, 24414, 44100, 48000, 96000]


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("channels", [1, 2])
def test_load_resamples_and_downmixes(write_audio, tmp_path, rate, channels):
    path = write_audio(tmp_path / "a.wav", seconds=0.5, sample_rate=rate, channels=channels)
    info = audio_info(path)
    assert (info.sample_rate, info.channels) == (rate, channels)
    assert info.duration_s == pytest.approx(0.5, abs=1e-4)
    x = load_audio(path, sample_rate=16000)
    assert x.dtype == np.float32 and x.ndim == 1
    assert len(x) == pytest.approx(8000, abs=2)


def test_stream_equals_whole_file(write_audio, tmp_path):
    path = write_audio(tmp_path / "a.flac", seconds=3.0, sample_rate=44100)
    blocks = list(stream_audio(path, sample_rate=16000, block_seconds=0.7))
    assert len(blocks) > 3
    whole = load_audio(path, sample_rate=16000)
    streamed = np.concatenate(blocks)
    assert abs(len(streamed) - len(whole)) <= 2
    n = min(len(whole), len(streamed))
    assert np.max(np.abs(streamed[100:n - 100] - whole[100:n - 100])) < 1e-3


def test_aiff_data_named_wav_is_read(tmp_path):
    path = tmp_path / "aiff.wav"
    sf.write(str(path), np.full(1600, 0.1, dtype=np.float32), 16000, format="AIFF")
    assert audio_info(path).format == "AIFF"
    assert len(load_audio(path)) == 1600


@pytest.mark.parametrize("content,reason", [(b"", "empty"), (b"RIFF....WAVEjunkjunk" * 3, "unreadable")])
def test_bad_headers(tmp_path, content, reason):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError) as err:
        audio_info(path)
    assert err.value.reason == reason


@pytest.mark.parametrize("fill,subtype,reason", [(0.0, "PCM_16", "silent"), (np.nan, "FLOAT", "non_finite"),
                                                 (np.inf, "DOUBLE", "non_finite")])
def test_bad_samples(tmp_path, fill, subtype, reason):
    x = np.zeros(4000, dtype=np.float64)
    x[2000] = fill
    path = tmp_path / "x.wav"
    sf.write(str(path), x, 16000, subtype=subtype)
    with pytest.raises(AudioError) as err:
        check_samples(audio_info(path))
    assert err.value.reason == reason


def test_load_range_outside_file(write_audio, tmp_path):
    path = write_audio(tmp_path / "a.wav", seconds=0.5)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(path, offset_s=2.0)

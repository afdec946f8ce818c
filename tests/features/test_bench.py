"""The benchmark: FLOP count of the base architecture, and the records it writes."""

from __future__ import annotations

import pytest
from transformers import Wav2Vec2Config

from features.bench import bench, encoder_flops


def test_base_costs_about_14_gflop_per_second_of_audio():
    per_second = encoder_flops(Wav2Vec2Config(), 16000 * 4) / 4
    assert 13.5e9 < per_second < 14.5e9


def test_records_time_this_tool_and_the_reference_over_the_same_audio(synth_files, make_manifest):
    tiny = Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(32, 32, 32), conv_kernel=(10, 8, 4), conv_stride=(5, 8, 8),
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    records = bench(device="cpu", dtypes=["bfloat16"], manifest=str(make_manifest(synth_files)), audio_seconds=3,
                    config=tiny, isolate=False)
    assert [r["dtype"] for r in records] == ["float32", "bfloat16"]  # float32 always runs: the cosine reference
    for record in records:
        assert record["device"] == "cpu" and 2.0 < record["audio_seconds"] < 5.0 and record["files"] >= 2
        assert record["throughput"] == pytest.approx(record["audio_seconds"] / record["wall_seconds"], rel=0.01)
        assert record["vs_reference"] == pytest.approx(record["throughput"] / record["reference_throughput"],
                                                       rel=0.01)
        assert record["ceiling_ratio"] > 0 and record["peak_rss_mb"] > 50 and record["matmul_gflops"] > 0
        assert 0 < record["startup_seconds"] < record["wall_seconds"]  # the model load at least, never all of it
        assert record["compute_throughput"] > record["throughput"]
        assert record["compute_ceiling_ratio"] == pytest.approx(
            record["ceiling_ratio"] * record["compute_throughput"] / record["throughput"], rel=0.01)
        assert record["compute_vs_reference"] == pytest.approx(
            record["vs_reference"] * record["compute_throughput"] / record["throughput"], rel=0.01)
        assert record["feature_encoder"] == record["feature_encoder_timing"]["chosen"]
    assert records[0]["cosine_vs_float32"] == 1.0 and 0.97 < records[1]["cosine_vs_float32"] < 1.0

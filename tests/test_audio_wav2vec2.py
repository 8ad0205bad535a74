"""wav2vec2 extractor on tiny models built here (random weights, saved to a temp dir): batched ==
per-utterance HF forwards, the bucket plan (one chunk at a time on CPU), layer selection, chunk
stitching, identity, and the no-weights error."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from extract.base import ExtractorUnavailable, Failure, Output, create
from manifests.schema import Media, Utterance

SR = 16000
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 4),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
LENGTHS = (16000, 5000, 23456, 800, 40000)


def build(path, cls="Wav2Vec2", **kw):
    import transformers

    cfg = getattr(transformers, f"{cls}Config")(**{**TINY, **kw})
    torch.manual_seed(0)
    getattr(transformers, f"{cls}Model")(cfg).eval().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("w2v")
    return {"group": build(d / "group", feat_extract_norm="group"),
            "layer": build(d / "layer", feat_extract_norm="layer", do_stable_layer_norm=True)}


@pytest.fixture(scope="module")
def utts(tmp_path_factory):
    d = tmp_path_factory.mktemp("wavs")
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(LENGTHS):
        p = d / f"u{i}.wav"
        x = np.clip(0.3 * rng.standard_normal(n), -1, 1).astype(np.float32)  # load_audio's range
        sf.write(p, x, SR, subtype="FLOAT")
        out.append(Utterance(f"u{i}", audio=Media(str(p))))
    return out


def reference(model_dir, utt, layer="last"):
    """The HF model on one unpadded utterance, normalised by the wav2vec2 processor."""
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    m = AutoModel.from_pretrained(model_dir).eval()
    w = sf.read(utt.audio.path, dtype="float32")[0]
    x = torch.from_numpy(Wav2Vec2FeatureExtractor()(w, sampling_rate=SR, return_tensors="np")["input_values"])
    with torch.no_grad():
        o = m(x, output_hidden_states=True)
    if layer == "last":
        return o.last_hidden_state[0].numpy()
    if isinstance(layer, int):
        return o.hidden_states[layer][0].numpy()
    return np.mean([o.hidden_states[i][0].numpy() for i in layer], axis=0)


@pytest.mark.parametrize("norm, cpu_batch", [("group", None), ("layer", None), ("group", 1)])
def test_batched_equals_per_utterance_forward(models, utts, norm, cpu_batch):
    e = create("wav2vec2", model=models[norm])
    e.cpu_batch = cpu_batch  # None: the GPU's padded buckets, here on CPU; 1: the CPU default
    assert (e.dim, e.frame_rate) == (32, SR / 80)
    outs = e.extract(utts)  # None: one batch, five lengths: heavy padding
    for u, o in zip(utts, outs):
        ref = reference(models[norm], u)
        assert o.features.shape == ref.shape
        np.testing.assert_allclose(o.features, ref, atol=1e-4)
    one_by_one = [e.extract([u])[0].features for u in utts]
    for a, b in zip(one_by_one, outs):
        np.testing.assert_allclose(a, b.features, atol=1e-4)


def test_bucket_plan():
    from extract.base import plan_buckets

    lengths = [10, 40, 30, 30, 5, 20]
    order = sorted(range(6), key=lambda k: lengths[k], reverse=True)  # 1, 2, 3, 5, 0, 4
    assert plan_buckets(order, lengths, budget=100) == [[1, 2], [3, 5, 0], [4]]  # 40x2, 30x3 <= 100
    assert plan_buckets(order, lengths, budget=100, limit=2) == [[1, 2], [3, 5], [0, 4]]
    assert plan_buckets(order, lengths, budget=100, limit=1) == [[k] for k in order]
    assert plan_buckets(order, lengths, budget=10) == [[k] for k in order]  # over budget: alone
    assert plan_buckets(order, lengths) == [order]
    # padding fraction: [40, 30, 30] pads 20 of 120 (0.17); adding 20 would pad 40 of 160 (0.25)
    assert plan_buckets(order, lengths, max_padding=0.2) == [[1, 2, 3], [5], [0], [4]]
    assert plan_buckets(order, lengths, max_padding=0.15) == [[1, 2], [3], [5], [0], [4]]
    # ascending: [5, 10] pads 0.25, [5, 10, 20] would pad 0.42; [20, 30, 30, 40] pads 0.25
    assert plan_buckets(order[::-1], lengths, max_padding=0.3) == [[4, 0], [5, 3, 2, 1]]


def test_cpu_forwards_one_chunk_at_a_time(models, utts, monkeypatch):
    """The CPU fallback is taken (bench/bench_audio.py: batching lost there), the GPU plan is not."""
    e = create("wav2vec2", model=models["group"])
    sizes: list[int] = []
    inner = e._forward
    monkeypatch.setattr(e, "_forward", lambda waves: sizes.append(len(waves)) or inner(waves))
    e.extract(utts)
    assert sizes == [1] * len(utts)
    e._device = "cuda"  # planning only: the same chunks in padded buckets under batch_seconds
    assert [len(b) for b in e._buckets(list(range(5)), [16000] * 5)] == [5]
    e.params["batch_seconds"] = 2.0
    assert [len(b) for b in e._buckets(list(range(5)), [16000] * 5)] == [2, 2, 1]


def test_plain_zero_padding_would_not_match(models, utts):
    """Why the masked group norm exists: HF's recipe for group-norm models (zero padding, no
    attention_mask) changes a short utterance's features when it shares a batch with a long one."""
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    m = AutoModel.from_pretrained(models["group"]).eval()
    fe = Wav2Vec2FeatureExtractor()
    w = [sf.read(u.audio.path, dtype="float32")[0] for u in (utts[1], utts[4])]
    x = fe(w, sampling_rate=SR, padding=True, return_tensors="pt")["input_values"]
    with torch.no_grad():
        padded = m(x).last_hidden_state[0].numpy()
    ref = reference(models["group"], utts[1])
    assert np.abs(padded[:len(ref)] - ref).max() > 1e-2


@pytest.mark.parametrize("layer, weights", [(0, None), (1, None), (-1, None), ([0, 1, 2], None), ([1, 2], [1.0, 3.0])])
def test_layer_selection(models, utts, layer, weights):
    u = utts[0]
    f = create("wav2vec2", model=models["group"], layer=layer, layer_weights=weights).extract([u])[0].features
    if weights is None:
        ref = reference(models["group"], u, layer)
    else:
        ref = 0.25 * reference(models["group"], u, 1) + 0.75 * reference(models["group"], u, 2)
    np.testing.assert_allclose(f, ref, atol=1e-4)


def test_bad_layer_parameters(models):
    with pytest.raises(ValueError, match="layer must be"):
        create("wav2vec2", model=models["group"], layer="middle")
    with pytest.raises(ValueError, match="layer_weights"):
        create("wav2vec2", model=models["group"], layer=[1, 2], layer_weights=[1.0])
    e = create("wav2vec2", model=models["group"], layer=7)
    with pytest.raises(ValueError, match="out of range"):
        e.ensure_loaded()


def test_long_audio_is_chunked_and_stitched(models, utts):
    """Chunk starts sit on the conv hop, so the CNN frames line up; layer 0 (CNN + positional conv,
    16-frame kernel) then equals the unchunked forward everywhere when each overlap half covers the
    kernel (layer-norm convs: no per-chunk statistics)."""
    u = utts[4]  # 2.5 s, chunks of 0.5 s with 0.2 s (40 frames) overlap
    full = create("wav2vec2", model=models["layer"], layer=0).extract([u])[0]
    ch = create("wav2vec2", model=models["layer"], layer=0, chunk_s=0.5, overlap_s=0.2).extract([u])[0]
    assert ch.info == {"chunks": 8} and full.info == {}
    np.testing.assert_allclose(ch.features, full.features, atol=1e-5)
    last = create("wav2vec2", model=models["layer"], chunk_s=0.5, overlap_s=0.2).extract([u])[0]
    assert last.features.shape == full.features.shape
    # a long utterance's chunks batch with short utterances and stay equal to chunking it alone
    mixed = create("wav2vec2", model=models["group"], chunk_s=0.5, overlap_s=0.2).extract(utts)
    alone = create("wav2vec2", model=models["group"], chunk_s=0.5, overlap_s=0.2).extract([u])[0]
    np.testing.assert_allclose(mixed[4].features, alone.features, atol=1e-4)
    with pytest.raises(ValueError, match="overlap_s"):
        create("wav2vec2", model=models["layer"], chunk_s=1.0, overlap_s=0.6)


def test_other_model_families(tmp_path, utts):
    for cls in ("Hubert", "WavLM"):
        path = build(tmp_path / cls, cls=cls, feat_extract_norm="group")
        outs = create("wav2vec2", model=path).extract(utts[:3])
        for u, o in zip(utts, outs):
            np.testing.assert_allclose(o.features, reference(path, u), atol=1e-4)


def test_failures_do_not_stop_the_batch(models, utts, tmp_path):
    batch = [utts[0], Utterance("gone", audio=Media(str(tmp_path / "gone.wav"))), Utterance("noaudio"), utts[1]]
    outs = create("wav2vec2", model=models["group"]).extract(batch)
    assert isinstance(outs[0], Output) and isinstance(outs[3], Output)
    assert isinstance(outs[1], Failure) and "gone.wav" in outs[1].reason
    assert isinstance(outs[2], Failure) and "no audio" in outs[2].reason


def test_identity_follows_the_weights(models, tmp_path):
    import shutil

    a = create("wav2vec2", model=models["group"])
    copy = tmp_path / "copy"
    shutil.copytree(models["group"], copy)
    b = create("wav2vec2", model=str(copy))
    assert a.model_identity() == b.model_identity() and a.key == b.key  # content, not path
    assert str(copy) not in str(b.config())
    other = create("wav2vec2", model=models["layer"])
    assert other.model_identity()["weights"] != a.model_identity()["weights"]
    assert a.key != create("wav2vec2", model=models["group"], layer=1).key


def test_no_weights_says_how_to_provide_them(tmp_path):
    e = create("wav2vec2", model="imer-test/no-such-speech-model")
    with pytest.raises(ExtractorUnavailable) as err:
        e.ensure_loaded()
    msg = str(err.value)
    assert "imer-test/no-such-speech-model" in msg and "HF_HOME" in msg and "local" in msg
    assert "huggingface-cli download" in msg
    assert e.model_identity()["commit"] is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExtractorUnavailable, match="no weights"):
        create("wav2vec2", model=str(empty)).ensure_loaded()


def test_cheap_availability_check(models, tmp_path):
    """The runner calls check_available before importing torch or transformers: it must refuse
    exactly what load() would refuse, and pass a real local model."""
    create("wav2vec2", model=str(models["group"])).check_available()
    for missing in ("imer-test/no-such-speech-model", str(tmp_path)):
        with pytest.raises(ExtractorUnavailable, match="no weights"):
            create("wav2vec2", model=missing).check_available()

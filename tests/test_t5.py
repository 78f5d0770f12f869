"""T5 text encoder: parity with transformers (model, tokenizer, bucket ids), HF folder loading
(safetensors / sharded / .bin / full encoder-decoder checkpoints), the tiny tokenizer trainer,
the embedder's cache, and caption cleaning.

Parity tolerance: max |ours - transformers| <= 1e-5 * max |transformers| in float32 (measured
~1e-6 relative on these tiny models).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest

import mindspore as ms

from opensora.text_encoder import (T5Config, T5Embedder, T5Encoder, T5Tokenizer, load_hf_t5_weights,
                                   train_sentencepiece)
from opensora.text_encoder import clean as clean_mod
from opensora.text_encoder.t5 import relative_position_bucket_table

CAPTIONS = [f"a {c} {s} moving {d}" for c in ("red", "green", "blue", "yellow") for s in ("square", "circle")
            for d in ("left", "right")]
HF_KW = dict(vocab_size=192, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
PROMPTS = ["a red square moving left", "a blue circle", "", "a purple <extra_id_0> thing moving up and down again"]
L = 10
TINY = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)


def _rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    return train_sentencepiece(CAPTIONS, str(tmp_path_factory.mktemp("tok")), vocab_size=64)


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.T5EncoderModel(transformers.T5Config(**HF_KW)).eval()


def _hf_reference(model, spiece_path, prompts, max_length):
    import torch
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = transformers.T5Tokenizer(spiece_path)
        enc = tok(list(prompts), max_length=max_length, padding="max_length", truncation=True,
                  return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    return enc["input_ids"].numpy(), enc["attention_mask"].numpy(), out.numpy()


def _save_hf(model, folder, spiece_path, **kw):
    model.save_pretrained(str(folder), **kw)
    shutil.copyfile(spiece_path, folder / "spiece.model")
    return folder


# ================================================================
# Model pieces
# ================================================================


def test_relative_position_buckets_hand_values():
    # num_buckets 32 -> 16 per direction, exact below 8, log-spaced up to 128; key - query > 0 adds 16
    table = relative_position_bucket_table(32, 128)
    bucket = lambda d: int(table[int(np.clip(d, -128, 128)) + 128])  # noqa: E731
    assert [bucket(d) for d in (0, 1, 7, -1, -7)] == [0, 17, 23, 1, 7]
    # d=16: 8 + floor(log(16/8) / log(128/8) * 8) = 8 + 2
    assert bucket(16) == 16 + 10 and bucket(-16) == 10
    assert bucket(127) == 31 and bucket(500) == 31 and bucket(-500) == 15


def test_relative_position_buckets_match_transformers():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.t5.modeling_t5")
    d = np.arange(-700, 701)
    for nb, md in [(32, 128), (32, 64), (16, 20), (64, 256)]:
        ref = modeling.T5Attention._relative_position_bucket(torch.tensor(d), bidirectional=True, num_buckets=nb,
                                                              max_distance=md).numpy()
        ours = relative_position_bucket_table(nb, md)[np.clip(d, -md, md) + md]
        np.testing.assert_array_equal(ours, ref)


def test_parameter_names_equal_hf_keys(hf_model):
    cfg = T5Config(**HF_KW)
    names = {n for n, _ in T5Encoder(cfg, seed=None).parameters_and_names()}
    hf_keys = set(hf_model.state_dict()) - {"encoder.embed_tokens.weight"}  # tied alias of shared.weight
    assert names == hf_keys


def test_encoder_matches_transformers_graph_and_pynative(hf_model):
    """Same weights, padded batch with relative distances beyond max_distance: both MindSpore modes."""
    import torch
    import transformers

    kw = dict(HF_KW, relative_attention_num_buckets=8, relative_attention_max_distance=6)
    torch.manual_seed(1)
    hf = transformers.T5EncoderModel(transformers.T5Config(**kw)).eval()
    ours = T5Encoder(T5Config(**{k: v for k, v in kw.items()}), seed=None)
    sd = hf.state_dict()
    for name, p in ours.parameters_and_names():
        p.set_data(ms.Tensor(sd[name].numpy()))
    ids = np.random.default_rng(0).integers(0, kw["vocab_size"], (3, 12)).astype(np.int32)
    mask = np.ones((3, 12), np.int32)
    mask[1, 5:] = 0
    mask[2, 9:] = 0
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    out = ours(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    assert out.dtype == np.float32
    assert _rel_err(out, ref) <= 1e-5, _rel_err(out, ref)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        out_graph = ours(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    finally:
        ms.set_context(mode=mode)
    assert _rel_err(out_graph, ref) <= 1e-5, _rel_err(out_graph, ref)


# ================================================================
# Tokenizer
# ================================================================


TOKENIZER_TEXTS = [
    "a red square moving left", "", "   ", "A Purple  triangle, moving UP!", "a red square </s>", "a red square</s>moving",
    "hello <extra_id_0>. world<extra_id_99>x <extra_id_100>", " <extra_id_3> ", "<pad><unk> red", "é ü 你好 red",
    "a red square moving left a red square moving left a red square", "red\tblue\nleft", "▁red ▁ x",
]


def test_tokenizer_matches_transformers(spiece):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_tok = transformers.T5Tokenizer(spiece)  # legacy=True (default), transformers 4.57
        ours = T5Tokenizer(spiece)
        for max_length in (3, 8, 16, 40):
            ids, mask = ours(TOKENIZER_TEXTS, max_length)
            ref = ref_tok(TOKENIZER_TEXTS, max_length=max_length, padding="max_length", truncation=True,
                          return_attention_mask=True, add_special_tokens=True)
            assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (len(TOKENIZER_TEXTS), max_length)
            np.testing.assert_array_equal(ids, np.array(ref["input_ids"]))
            np.testing.assert_array_equal(mask, np.array(ref["attention_mask"]))
    assert ours.vocab_size == len(ref_tok)


def test_tokenizer_layout(spiece):
    tok = T5Tokenizer(spiece)
    ids, mask = tok(["a red square moving left", "a red square moving left a blue circle"], 7)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert ids[0, 5:].tolist() == [1, 0] and mask[0].tolist() == [1] * 6 + [0]  # 5 words, EOS, pad
    assert 1 not in ids[0, :5] and 0 not in ids[0, :5]
    assert ids[1, :5].tolist() == ids[0, :5].tolist() and ids[1, -1] == 1 and mask[1].sum() == 7  # truncated
    assert tok.decode(ids[0]) == "a red square moving left"


def test_train_sentencepiece_demo_captions(tmp_path):
    path = train_sentencepiece(CAPTIONS, str(tmp_path / "a"), vocab_size=64)
    again = train_sentencepiece(CAPTIONS, str(tmp_path / "b"), vocab_size=64)
    a, b = T5Tokenizer(path), T5Tokenizer(again)
    pieces = [(a.sp.id_to_piece(i), a.sp.get_score(i)) for i in range(a.sp_size)]
    assert pieces == [(b.sp.id_to_piece(i), b.sp.get_score(i)) for i in range(b.sp_size)]  # deterministic
    assert pieces[:3] == [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] and a.sp_size <= 64
    assert a.sp.bos_id() == -1
    # word-like pieces: every caption fits the demo's 8 tokens untruncated, and all 16 are distinct
    assert max(len(a.encode(c)) for c in CAPTIONS) <= 8
    assert a.tokenize("a red square moving left") == ["\u2581a", "\u2581red", "\u2581square", "\u2581moving", "\u2581left"]
    ids, mask = a(CAPTIONS, 8)
    assert len({tuple(r) for r in ids}) == 16
    assert not (ids == a.unk_token_id).any()


def test_train_sentencepiece_more_characters_than_vocab(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
             "ZEBRAS & QUAILS: 0123456789!"]
    tok = T5Tokenizer(train_sentencepiece(texts, str(tmp_path), vocab_size=24))
    assert tok.sp_size <= 24
    ids, _ = tok(["the lazy dog 42"], 12)
    assert ids[0, 0] != 0 and ids.max() < tok.sp_size


# ================================================================
# Loading HF folders
# ================================================================


@pytest.mark.parametrize("variant", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
def test_embedder_matches_transformers(hf_model, spiece, tmp_path, variant):
    kw = {"safetensors": dict(safe_serialization=True),
          "safetensors-sharded": dict(safe_serialization=True, max_shard_size="20KB"),
          "bin": dict(safe_serialization=False),
          "bin-sharded": dict(safe_serialization=False, max_shard_size="20KB")}[variant]
    folder = _save_hf(hf_model, tmp_path, spiece, **kw)
    if variant.endswith("sharded"):
        assert len([f for f in os.listdir(folder) if f.startswith(("model-", "pytorch_model-"))]) > 1
    emb = T5Embedder(from_pretrained=str(folder), model_max_length=L, clean_caption=False)
    assert not emb.load_report.missing and not emb.load_report.unexpected
    out = emb.encode(PROMPTS)
    ids, mask, ref = _hf_reference(hf_model, spiece, PROMPTS, L)
    assert out["y"].shape == (4, 1, L, 32) and out["y"].dtype == np.float32
    assert out["mask"].dtype == np.int32
    np.testing.assert_array_equal(emb.tokenize(PROMPTS)[0], ids)
    np.testing.assert_array_equal(out["mask"], mask)
    assert _rel_err(out["y"][:, 0], ref) <= 1e-5, _rel_err(out["y"][:, 0], ref)
    assert emb.output_dim == 32


def test_full_t5_checkpoint_skips_decoder(spiece, tmp_path):
    """A T5ForConditionalGeneration folder (like DeepFloyd/t5-v1_1-xxl) loads its encoder only."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    full = transformers.T5ForConditionalGeneration(transformers.T5Config(**HF_KW, num_decoder_layers=1)).eval()
    folder = _save_hf(full, tmp_path, spiece, safe_serialization=True, max_shard_size="20KB")
    ours = T5Encoder(T5Config.from_json(folder / "config.json"), seed=None)
    report = load_hf_t5_weights(ours, folder)
    assert not report.missing and not report.unexpected
    assert report.skipped and all(k.startswith(("decoder.", "lm_head.", "encoder.embed_tokens")) for k in report.skipped)
    ids = np.array([[5, 6, 7, 1, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    mask[0, 3] = 1
    with torch.no_grad():
        ref = full.encoder(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask)).last_hidden_state
    out = ours(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    assert _rel_err(out, ref.numpy()) <= 1e-5


def _sharded_folder(folder, spiece_path):
    """A random tiny encoder saved as an HF folder with two safetensors shards and an index (no torch)."""
    from safetensors.numpy import load_file, save_file

    T5Embedder(config=TINY, tokenizer_path=spiece_path, model_max_length=8).save_pretrained(str(folder))
    tensors = load_file(str(folder / "model.safetensors"))
    os.remove(folder / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / shard))
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, weight_map


def test_missing_files_are_named(spiece, tmp_path):
    folder, weight_map = _sharded_folder(tmp_path / "sharded", spiece)
    T5Embedder(from_pretrained=str(folder), model_max_length=8)  # complete folder loads
    shard = weight_map["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    os.remove(folder / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        T5Embedder(from_pretrained=str(folder))

    folder, _ = _sharded_folder(tmp_path / "tok", spiece)
    os.remove(folder / "spiece.model")
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        T5Embedder(from_pretrained=str(folder))
    shutil.copyfile(spiece, folder / "spiece.model")
    config = (folder / "config.json").read_text()
    os.remove(folder / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        T5Embedder(from_pretrained=str(folder))
    (folder / "config.json").write_text(config)
    os.remove(folder / "model.safetensors.index.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        T5Embedder(from_pretrained=str(folder))


def test_shape_mismatch_is_an_error(hf_model, spiece, tmp_path):
    folder = _save_hf(hf_model, tmp_path, spiece, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["d_ff"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="DenseReluDense"):
        T5Embedder(from_pretrained=str(folder))


# ================================================================
# Random (demo) embedder, cache, save/load round trip
# ================================================================

def test_random_embedder_is_seeded_and_caches(spiece):
    a = T5Embedder(config=TINY, tokenizer_path=spiece, model_max_length=8, seed=0, clean_caption=False)
    b = T5Embedder(config=TINY, tokenizer_path=spiece, model_max_length=8, seed=0, clean_caption=False)
    c = T5Embedder(config=TINY, tokenizer_path=spiece, model_max_length=8, seed=1, clean_caption=False)
    prompts = CAPTIONS[:3] + CAPTIONS[:1]
    ya = a.encode(prompts)
    np.testing.assert_array_equal(ya["y"], b.encode(prompts)["y"])
    assert not np.allclose(ya["y"], c.encode(prompts)["y"])
    np.testing.assert_array_equal(ya["y"][0], ya["y"][3])
    assert ya["y"].shape == (4, 1, 8, 16) and ya["mask"].shape == (4, 8)
    assert a.tokenizer.extra_ids == 64 - a.tokenizer.sp_size  # sentinels limited to the embedding table
    with pytest.raises(ValueError, match="output_dim"):
        T5Embedder(config=TINY, tokenizer_path=spiece, output_dim=32)

    calls = []
    run = a._run
    a._run = lambda p: calls.append(list(p)) or run(p)
    again = a.encode(prompts[::-1])
    assert calls == []  # all cached
    np.testing.assert_array_equal(again["y"], ya["y"][::-1])
    a.encode(CAPTIONS[:5])
    assert calls == [CAPTIONS[3:5]]  # only the new ones are encoded
    again["y"][:] = 0  # returned arrays are copies
    np.testing.assert_array_equal(a.encode(prompts)["y"], ya["y"])


def test_save_pretrained_round_trip(spiece, tmp_path):
    emb = T5Embedder(config=TINY, tokenizer_path=spiece, model_max_length=8, seed=3, clean_caption=False)
    emb.save_pretrained(str(tmp_path))
    loaded = T5Embedder(from_pretrained=str(tmp_path), model_max_length=8, clean_caption=False)
    np.testing.assert_array_equal(loaded.encode(CAPTIONS)["y"], emb.encode(CAPTIONS)["y"])
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.T5EncoderModel.from_pretrained(str(tmp_path)).eval()
        tok = transformers.T5Tokenizer.from_pretrained(str(tmp_path))
    enc = tok(CAPTIONS + ["x <extra_id_0>"], max_length=8, padding="max_length", truncation=True, return_tensors="pt")
    np.testing.assert_array_equal(emb.tokenize(CAPTIONS + ["x <extra_id_0>"])[0], enc["input_ids"].numpy())
    with torch.no_grad():
        ref = hf(**enc).last_hidden_state.numpy()
    assert _rel_err(emb.encode(CAPTIONS + ["x <extra_id_0>"])["y"][:, 0], ref) <= 1e-5


def test_fp16_encoder_close_to_fp32(spiece):
    e32 = T5Embedder(config=TINY, tokenizer_path=spiece, model_max_length=8, clean_caption=False)
    e16 = T5Embedder(config=TINY, tokenizer_path=spiece, model_max_length=8, dtype="fp16", clean_caption=False)
    y32, y16 = e32.encode(CAPTIONS[:4])["y"], e16.encode(CAPTIONS[:4])["y"]
    assert y16.dtype == np.float32 and _rel_err(y16, y32) < 1e-2


def test_embedder_cleans_captions(spiece):
    emb = T5Embedder(config=TINY, tokenizer_path=spiece, model_max_length=8, clean_caption=True)
    out = emb.encode(["  A <b>RED</b> Square moving LEFT  ", "a red square moving left"])
    np.testing.assert_array_equal(out["y"][0], out["y"][1])


# ================================================================
# Caption cleaning
# ================================================================

# expected values produced by PixArt / Open-Sora v1.1 text_preprocessing (with ftfy 6.3.1, bs4 4.15)
CLEAN_CASES = [
    ("Check https://example.com/page?x=1 for <b>bold</b> &amp; more!!", "check ?x=1 for bold more!!"),
    ("@user loves this 你好 photo — “quoted” text ‘single’", "loves this photo - \"quoted\" text 'single"),
    ("ip 192.168.0.1 and file image_01.jpg, #12 #123456", "ip and file"),
    ("this-is-my-cute-cat_on_a-mat", "this is my cute cat on a mat"),
    ("ＬＯＵＤ\u3000ＮＯＩＳＥＳ ﬁne ﬂow", "loud noises fine flow"),
    ("jc6640 and 6640vc231 at 1920x1080 page 12", "and at"),
    ("Free shipping worldwide; download free! click for more", "worldwide; !"),
    ('"A Quoted Caption"', "a quoted caption"),
    ("<person> walks a dog", "person walks a dog"),
    ("x &lt;tag&gt; y", "x y"),
    ("a%20b+c", "a b c"),
]


def test_clean_caption():
    for raw, expected in CLEAN_CASES:
        assert clean_mod.text_preprocessing(raw) == expected, raw

"""CLIP in MindSpore against transformers' CLIPModel, CLIPTokenizer(Fast) and CLIPImageProcessor.

Two tiny random CLIPModels saved with save_pretrained stand for the two layouts (tests/helpers.py:
ViT-B/32-like with quick_gelu and legacy argmax pooling in safetensors, ViT-L/14-like with gelu and
first-EOS pooling in pytorch_model.bin), their tokenizer vocabulary built in tmp_path.
Tolerance: max |ours - transformers| <= 1e-5 * max |transformers| for float32 (measured ~1e-6).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import mindspore as ms

from opensora.eval.clip import CLIP, CLIPConfig, CLIPModel, check_folder, eos_positions, load_clip_weights
from opensora.eval.clip_processing import BOS, EOS, CLIPImageProcessor, CLIPTokenizer
from helpers import LAYOUTS, MAX_LEN, make_clip_folder, write_vocab

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a cat", "A DOG   running on the beach!!", "it's 2 o'clock, isn't it?", "café naïve ümlaut",
         "tabs\tand\nnewlines", "", "a " * 40 + "very long caption that is cut", "<|startoftext|>a cat<|endoftext|>",
         "emoji 🐱 and symbols #@%"]


def _rel_err(ours, ref):
    return float(np.abs(np.asarray(ours) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_vocab")
    write_vocab(folder)
    return folder


@pytest.fixture(scope="module")
def references(tmp_path_factory, tok_folder):
    """{layout: (transformers CLIPModel, folder)}: config, weights, tokenizer files, preprocessor config."""
    out = {}
    for name in LAYOUTS:
        folder = tmp_path_factory.mktemp(name)
        out[name] = (make_clip_folder(folder, name, tok_folder), folder)
    return out


def _hf_inputs(folder, texts, images):
    tok = transformers.CLIPTokenizerFast.from_pretrained(folder)
    proc = transformers.CLIPImageProcessor.from_pretrained(folder)
    enc = tok(list(texts), padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"], proc(list(images), return_tensors="np")["pixel_values"]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(40, 64), (64, 41), (29, 29), (20, 50), (33, 90)]
    return [rng.integers(0, 256, sizes[i % len(sizes)] + (3,), dtype=np.uint8) for i in range(n)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_model_matches_transformers(references, layout):
    model, folder = references[layout]
    ours = CLIPModel(CLIPConfig.from_json(folder / "config.json"))
    weights = folder / ("model.safetensors" if LAYOUTS[layout]["safetensors"] else "pytorch_model.bin")
    assert weights.is_file()
    load_clip_weights(ours, weights)
    ids, mask, pixels = _hf_inputs(folder, TEXTS[:4], _images(3))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    pixel_values=torch.from_numpy(pixels))
    pool = eos_positions(ids, model.config.text_config.eos_token_id)
    got = ours(ms.Tensor(pixels), ms.Tensor(ids.astype(np.int32)), ms.Tensor(pool))
    for name, a, b in zip(("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"), got,
                          (ref.logits_per_image, ref.logits_per_text, ref.text_embeds, ref.image_embeds)):
        assert a.shape == tuple(b.shape), name
        assert _rel_err(a.asnumpy(), b.numpy()) <= 1e-5, name
    # the logits are not trivially equal: they spread over the batch
    assert np.ptp(ref.logits_per_image.numpy()) > 0.1
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=torch.from_numpy(pixels)).numpy()
        text_features = model.get_text_features(input_ids=torch.from_numpy(ids)).numpy()
    assert _rel_err(ours.get_image_features(ms.Tensor(pixels)).asnumpy(), image_features) <= 1e-5
    assert _rel_err(ours.get_text_features(ms.Tensor(ids.astype(np.int32)), ms.Tensor(pool)).asnumpy(),
                    text_features) <= 1e-5


def test_pooling_rule():
    ids = np.array([[5, 9, 7, 9, 9], [5, 3, 9, 1, 1]])
    np.testing.assert_array_equal(eos_positions(ids, 2), [1, 2])  # legacy: first largest id
    np.testing.assert_array_equal(eos_positions(ids, 7), [2, 0])  # first EOS (none in row 1: 0, as torch)
    np.testing.assert_array_equal(eos_positions(ids, 1), [0, 3])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_clip_wrapper_end_to_end(references, layout):
    """CLIP(folder): its own tokenizer and image processor, then features, against transformers' pipeline."""
    model, folder = references[layout]
    clip = CLIP(str(folder), batch_size=2)
    images = _images(5, seed=1)
    ids, _, pixels = _hf_inputs(folder, TEXTS, images)
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=torch.from_numpy(pixels)).numpy()
        ref_txt = model.get_text_features(input_ids=torch.from_numpy(ids)).numpy()
    img = clip.images_features(images, normalize=False)
    txt = clip.text_features(TEXTS, normalize=False)
    assert _rel_err(img, ref_img) <= 1e-5 and _rel_err(txt, ref_txt) <= 1e-5
    unit = clip.text_features(TEXTS[:3])
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, atol=1e-6)
    assert clip.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)


def test_image_only_model_skips_the_text_tower(references):
    model, folder = references["vit_l14"]
    clip = CLIP(str(folder), with_text=False)
    assert not any(n.startswith("text_") for n, _ in clip.model.parameters_and_names())
    _, _, pixels = _hf_inputs(folder, ["x"], _images(2))
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=torch.from_numpy(pixels)).numpy()
    assert _rel_err(clip.image_features(pixels, normalize=False), ref) <= 1e-5
    with pytest.raises(ValueError, match="without its text tower"):
        clip.text_features(["a cat"])


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab+merges"])
def test_tokenizer_matches_transformers(references, tok_folder, tmp_path, source):
    _, folder = references["vit_b32"]
    if source == "vocab+merges":
        for name in ("vocab.json", "merges.txt"):
            (tmp_path / name).write_bytes((tok_folder / name).read_bytes())
        folder = tmp_path
    ours = CLIPTokenizer.from_folder(folder, MAX_LEN)
    ids, mask = ours(TEXTS)
    fast = transformers.CLIPTokenizerFast(vocab_file=str(tok_folder / "vocab.json"),
                                          merges_file=str(tok_folder / "merges.txt"))
    slow = transformers.CLIPTokenizer(vocab_file=str(tok_folder / "vocab.json"),
                                      merges_file=str(tok_folder / "merges.txt"))
    for ref in (fast, slow):
        enc = ref(TEXTS, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="np")
        np.testing.assert_array_equal(ids, enc["input_ids"], err_msg=type(ref).__name__)
        np.testing.assert_array_equal(mask, enc["attention_mask"], err_msg=type(ref).__name__)
    vocab = json.loads((tok_folder / "vocab.json").read_text())
    assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), MAX_LEN)
    assert (ids[:, 0] == vocab[BOS]).all()
    long_row = TEXTS.index(next(t for t in TEXTS if t.startswith("a a a")))
    assert ids[long_row, -1] == vocab[EOS] and mask[long_row].all()  # truncated: BOS + 14 + EOS
    assert ids[TEXTS.index(""), :2].tolist() == [vocab[BOS], vocab[EOS]] and mask[TEXTS.index("")].sum() == 2


def test_image_processor_matches_transformers(references):
    _, folder = references["vit_l14"]
    ours = CLIPImageProcessor.from_folder(folder)
    ref = transformers.CLIPImageProcessor.from_pretrained(folder)
    rng = np.random.default_rng(3)
    # landscape, portrait, odd overhangs (crop offset floors), square, smaller than the crop on one side
    for shape in [(40, 64), (64, 41), (28, 28), (29, 31), (30, 95), (1, 50)]:
        image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        want = ref(image, return_tensors="np", input_data_format="channels_last")["pixel_values"][0]
        got = ours([image])[0]
        assert got.shape == want.shape == (3, 28, 28), shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=str(shape))  # same PIL resize; fp32 rounding
    assert ours.output_size(40, 64) == (28, 44) and ours.output_size(64, 41) == (43, 28)


def test_config_reads_legacy_dicts_and_defaults():
    c = CLIPConfig.from_dict({"text_config": {"hidden_size": 64}, "text_config_dict": {"hidden_size": 768,
                              "num_attention_heads": 12}, "vision_config_dict": {"patch_size": 14}, "projection_dim": 768})
    assert c.text.hidden_size == 768 and c.text.num_attention_heads == 12 and c.vision.patch_size == 14
    assert c.text.hidden_act == c.vision.hidden_act == "quick_gelu" and c.text.eos_token_id == 49407
    assert c.projection_dim == 768 and c.vision.image_size == 224
    with pytest.raises(ValueError, match="not a CLIPModel config"):
        CLIPConfig.from_dict({"model_type": "t5", "d_model": 8})
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPConfig.from_dict({"text_config": {"hidden_act": "swiglu"}})


def test_errors_name_the_path_and_key(references, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"clip\.from_pretrained=.*nope does not exist"):
        check_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="clip.from_pretrained is not set"):
        check_folder(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_folder(tmp_path / "empty", "task.model")
    _, folder = references["vit_b32"]
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="no CLIP weights found"):
        CLIP(str(tmp_path / "noweights"))
    # the other layout's weights: shapes do not fit
    ours = CLIPModel(CLIPConfig.from_json(folder / "config.json"))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_clip_weights(ours, references["vit_l14"][1] / "pytorch_model.bin")

"""What the evaluation tests share: tiny random CLIP folders, and a PyTorch LPIPS reference.

CLIP folders are written like Hugging Face's (save_pretrained of transformers'
CLIPModel, CLIPTokenizerFast and CLIPImageProcessor) on a vocabulary built in the folder:
the 256 byte symbols, their "</w>" forms, 40 merges learned by the `tokenizers` BPE trainer on a few
captions, and the two special tokens. Every parameter (LayerNorm affines and biases too) is perturbed
by N(0, 0.2^2), which makes attention far from uniform and the position embeddings as large as the
token embeddings.

Two layouts:
    vit_b32  patch 8 on 32 px, quick_gelu, legacy eos_token_id 2 (argmax pooling), safetensors
    vit_l14  patch 7 on 28 px, gelu, eos_token_id = the real EOS id (first-EOS pooling), pytorch_model.bin
"""
from __future__ import annotations

import json
from pathlib import Path

from opensora.eval.clip_processing import BOS, EOS, SPLIT_PATTERN

CORPUS = ["a photo of a cat", "a dog running on the beach", "the red square moves left", "a cat and a dog",
          "two dogs play with a red ball", "a photo of the beach at sunset"]
MAX_LEN = 16
LAYOUTS = {
    "vit_b32": dict(patch_size=8, image_size=32, act="quick_gelu", legacy_eos=True, text=(32, 4, 48), vision=(24, 3, 40),
                    projection=16, safetensors=True),
    "vit_l14": dict(patch_size=7, image_size=28, act="gelu", legacy_eos=False, text=(24, 2, 40), vision=(32, 4, 56),
                    projection=20, safetensors=False),
}


def write_vocab(folder: Path) -> dict:
    """CLIP-style vocab.json + merges.txt in `folder`; returns the vocab."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    trainer_tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    trainer_tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=300, end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trainer_tok.train_from_iterator(CORPUS * 3, trainer)
    merges = json.loads(trainer_tok.to_str())["model"]["merges"][:40]
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab


def make_clip_folder(folder: Path, layout: str, tok_folder: Path, seed: int = 0):
    """A tiny CLIP of `layout` saved in `folder` with the tokenizer of `tok_folder` (write_vocab);
    returns the transformers CLIPModel."""
    import torch
    import transformers

    spec = LAYOUTS[layout]
    vocab = json.loads((tok_folder / "vocab.json").read_text())
    torch.manual_seed(seed)
    (th, tn, ti), (vh, vn, vi) = spec["text"], spec["vision"]
    eos = 2 if spec["legacy_eos"] else vocab[EOS]
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=th, num_attention_heads=tn, intermediate_size=ti,
                         num_hidden_layers=2, max_position_embeddings=MAX_LEN, hidden_act=spec["act"],
                         bos_token_id=vocab[BOS], eos_token_id=eos, pad_token_id=vocab[EOS]),
        vision_config=dict(hidden_size=vh, num_attention_heads=vn, intermediate_size=vi, num_hidden_layers=2,
                           image_size=spec["image_size"], patch_size=spec["patch_size"], hidden_act=spec["act"]),
        projection_dim=spec["projection"])
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=spec["safetensors"])
    fast = transformers.CLIPTokenizerFast(vocab_file=str(tok_folder / "vocab.json"),
                                          merges_file=str(tok_folder / "merges.txt"), model_max_length=MAX_LEN)
    fast.save_pretrained(folder)
    s = spec["image_size"]
    transformers.CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(folder)
    return model


def hf_pipeline(folder: Path):
    """transformers' (CLIPTokenizerFast, CLIPImageProcessor) of a folder."""
    import transformers

    return (transformers.CLIPTokenizerFast.from_pretrained(folder),
            transformers.CLIPImageProcessor.from_pretrained(folder))


def tiny_clip(tmp_path_factory, layout: str, seed: int = 0):
    """(transformers CLIPModel, folder) of a tiny CLIP with its own vocabulary, in fresh tmp folders."""
    tok = tmp_path_factory.mktemp("vocab")
    write_vocab(tok)
    folder = tmp_path_factory.mktemp(f"clip_{layout}")
    return make_clip_folder(folder, layout, tok, seed=seed), folder


# ================================================================
# LPIPS reference in PyTorch, written from the lpips package's code (lpips/lpips.py: ScalingLayer,
# normalize_tensor, NetLinLayer, spatial_average; pretrained_networks.alexnet: torchvision's AlexNet.features
# cut after relu1..relu5). The package itself needs torchvision, which is not installed.
# ================================================================


def torch_alexnet_features():
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
                         nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(3, 2))


def torch_lpips(features, heads, x0, x1):
    """lpips.LPIPS(net='alex', version='0.1', spatial=False).forward(x0, x1) for inputs in [-1, 1]."""
    import torch

    shift = torch.tensor([-.030, -.088, -.188])[None, :, None, None]
    scale = torch.tensor([.458, .448, .450])[None, :, None, None]
    slices = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]

    def feats(x):
        h, outs = (x - shift) / scale, []
        for a, b in slices:
            for i in range(a, b):
                h = features[i](h)
            outs.append(h)
        return outs

    def norm(t):
        return t / (torch.sqrt(torch.sum(t ** 2, dim=1, keepdim=True)) + 1e-10)

    val = 0
    for k, (a, b) in enumerate(zip(feats(x0), feats(x1))):
        diff = (norm(a) - norm(b)) ** 2
        val = val + torch.nn.functional.conv2d(diff, heads[f"lin{k}.model.1.weight"]).mean([2, 3], keepdim=True)
    return val.flatten()


def lpips_files(folder: Path, seed: int = 0, head_scale: float = 1.0):
    """(features module, heads dict, alexnet.pth, alex.pth): random AlexNet features saved as torchvision names
    them (with a classifier tensor, which is not used) and random LPIPS heads."""
    import torch

    from opensora.eval.lpips import CHANNELS

    torch.manual_seed(seed)
    features = torch_alexnet_features().eval()
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd["classifier.1.weight"] = torch.randn(8, 4)
    torch.save(sd, folder / "alexnet.pth")
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) * head_scale for k, c in enumerate(CHANNELS)}
    torch.save(heads, folder / "alex.pth")
    return features, heads, folder / "alexnet.pth", folder / "alex.pth"

"""The LAION "improved aesthetic predictor" head on CLIP image embeddings (the data tools' `aes` score).

The head is the MLP of christophschuhmann/improved-aesthetic-predictor as Open-Sora's
tools/scoring/aesthetic/inference.py (v1.1.0) builds it: five Linear layers with no activation between
them (Dropout 0.2, 0.2, 0.1 after the first three, identities at inference):

    layers.0  Linear(D, 1024)   layers.2  Linear(1024, 128)   layers.4  Linear(128, 64)
    layers.6  Linear(64, 16)    layers.7  Linear(16, 1)

loaded by these names from the released `sac+logos+ava1-l14-linearMSE.pth` (D = 768, the CLIP
ViT-L/14 projection) with torch.load(weights_only=True); the sizes are read from the file. Its input
is the L2-normalised CLIP image embedding; a clip's score is the mean over its frames (3 frames at
10 / 50 / 90 % of the video in the original; an image is one frame). Scores fall roughly in 1-10
(README of the original: 5.5 fair, 6.5 high).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import mindspore as ms
from mindspore import nn

from opensora.model.layers import Linear

LAYER_INDICES = (0, 2, 4, 6, 7)  # positions of the Linear layers in the original nn.Sequential


class AestheticHead(nn.Cell):
    """[N, D] unit-norm CLIP image embeddings -> [N] aesthetic scores. `sizes` = (D, 1024, 128, 64, 16, 1)
    for the released head."""

    def __init__(self, sizes=(768, 1024, 128, 64, 16, 1)):
        super().__init__()
        if len(sizes) != len(LAYER_INDICES) + 1:
            raise ValueError(f"the aesthetic head has {len(LAYER_INDICES)} linear layers: need 6 sizes, got {sizes}")
        self.sizes = tuple(int(s) for s in sizes)
        self.layers = nn.CellList()
        for position in range(LAYER_INDICES[-1] + 1):
            if position in LAYER_INDICES:
                k = LAYER_INDICES.index(position)
                self.layers.append(Linear(self.sizes[k], self.sizes[k + 1]))
            else:
                self.layers.append(nn.Identity())  # Dropout at training time

    def construct(self, x):
        for layer in self.layers:
            x = layer(x)
        return x[:, 0]


def load_aesthetic_head(path, config_key: str = "task.head_path") -> AestheticHead:
    """The head of a .pth (or .safetensors / .ckpt) holding layers.{0,2,4,6,7}.{weight,bias}, by name."""
    from opensora.model.pretrained import read_tensors

    p = Path(path) if path else None
    if p is None or not p.is_file():
        raise FileNotFoundError(
            f"{config_key}={path} does not exist: download the LAION aesthetic head (sac+logos+ava1-l14-linearMSE.pth "
            "from github.com/christophschuhmann/improved-aesthetic-predictor) there, or set "
            f"{config_key} to its path")
    source = read_tensors(p)
    names = [f"layers.{i}.{part}" for i in LAYER_INDICES for part in ("weight", "bias")]
    missing = [n for n in names if n not in source.shapes]
    if missing:
        raise ValueError(f"{p} is not an aesthetic-predictor head: it lacks {missing[:4]} (expected "
                         f"{names}; it has {list(source.shapes)[:6]})")
    sizes = [source.shapes["layers.0.weight"][1]] + [source.shapes[f"layers.{i}.weight"][0] for i in LAYER_INDICES]
    head = AestheticHead(sizes)
    params = dict(head.parameters_and_names())
    for name in names:
        want, got = tuple(params[name].shape), tuple(source.shapes[name])
        if want != got:
            raise ValueError(f"{p}: {name} has shape {list(got)}, expected {list(want)} (the layers do not chain)")
        params[name].set_data(ms.Tensor(np.ascontiguousarray(source.read(name), dtype=np.float32)))
    head.set_train(False)
    return head

"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"),
AlexNet variant (`lpips.LPIPS(net="alex")`, version 0.1), in MindSpore, from weights the user supplies.

Two files, read with torch.load(weights_only=True) (or as .safetensors / .ckpt):
    AlexNet   torchvision's ImageNet AlexNet (alexnet-owt-7be5be79.pth): features.{0,3,6,8,10}.{weight,bias}
              (classifier.* is not used); an LPIPS state dict with net.slice{k}.{i}.* names works too
    heads     the LPIPS linear layers (lpips/weights/v0.1/alex.pth): lin{0..4}.model.1.weight [1, C, 1, 1]

distance(x0, x1) for images in [-1, 1]: both go through the scaling layer ((x - shift) / scale,
shift (-.030, -.088, -.188), scale (.458, .448, .450)) and AlexNet's features; at each ReLU output
relu1..relu5 (channels 64, 192, 384, 256, 256) the features are unit-normalised over channels
(x / (||x|| + 1e-10)), their squared difference is weighted by the head's 1x1 conv (no bias) and
averaged over space; the five layers are summed. This is `spatial=False` (the package default); the
original Open-Sora eval/vae/cal_lpips.py used spatial=True and averaged the map upsampled to the input
size, which differs slightly. Inputs need H, W >= 31 (AlexNet's stride-4 conv and two 3/2 max-pools).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from opensora.vae.autoencoder_kl import Conv2d, set_conv_impl

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 192, 384, 256, 256)
# torchvision AlexNet.features: (index, in, out, kernel, stride, padding) of its convs
CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
         (10, 256, 256, 3, 1, 1))
POOLS = (2, 5)
TAPS = (1, 4, 7, 9, 11)  # the ReLUs whose outputs LPIPS compares (the ends of its slices 1..5)
MIN_SIZE = 31


class AlexNetFeatures(nn.Cell):
    """torchvision's AlexNet.features (parameter names features.{i}.weight / .bias): [N, 3, H, W] ->
    the five ReLU outputs LPIPS reads."""

    def __init__(self):
        super().__init__()
        layers = []
        convs = {c[0]: c for c in CONVS}
        for i in range(12):
            if i in convs:
                _, cin, cout, k, s, p = convs[i]
                layers.append(Conv2d(cin, cout, k, s, p))
            elif i in POOLS:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            else:
                layers.append(nn.ReLU())
        self.features = nn.CellList(layers)

    def construct(self, x):
        outs = ()
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                outs = outs + (x,)
        return outs


class NetLinLayer(nn.Cell):
    """LPIPS's 1x1 conv without bias (model.1.weight [1, C, 1, 1]; model.0 is its training dropout):
    [N, C, h, w] -> [N, h, w]."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.CellList([nn.Identity(), _Weight(channels)])

    def construct(self, x):
        return (x * self.model[1].weight).sum(axis=1)


class _Weight(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = ms.Parameter(ms.Tensor(np.zeros((1, channels, 1, 1), np.float32)), name="weight")


def _normalize(x, eps: float = 1e-10):
    return x / (ops.sqrt((x * x).sum(axis=1, keepdims=True)) + eps)


class LPIPS(nn.Cell):
    """(x0, x1) [N, 3, H, W] in [-1, 1] -> LPIPS distances [N] (float32)."""

    def __init__(self):
        super().__init__()
        self.net = AlexNetFeatures()
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (NetLinLayer(c) for c in CHANNELS)
        self.shift = ms.Tensor(np.array(SHIFT, np.float32).reshape(1, 3, 1, 1))
        self.scale = ms.Tensor(np.array(SCALE, np.float32).reshape(1, 3, 1, 1))

    def construct(self, x0, x1):
        f0 = self.net((x0 - self.shift) / self.scale)
        f1 = self.net((x1 - self.shift) / self.scale)
        lins = (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)
        total = 0
        for k in range(len(lins)):
            diff = ops.square(_normalize(f0[k]) - _normalize(f1[k]))
            total = total + lins[k](diff).mean(axis=(1, 2))  # spatial average: [N]
        return total


def _alexnet_name(key: str):
    """The parameter name of an AlexNet file's tensor (torchvision or LPIPS naming), or None."""
    parts = key.split(".")
    if parts[0] == "features" and len(parts) == 3:
        return "net." + key
    if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
        return f"net.features.{parts[2]}.{parts[3]}"
    return None


def load_lpips(alexnet_path, heads_path, alexnet_key: str = "task.lpips.alexnet_path",
               heads_key: str = "task.lpips.heads_path") -> LPIPS:
    """An LPIPS with the weights of the two files (see the module docstring); every parameter must be
    found with its shape. Errors name the file and the config key."""
    from opensora.model.pretrained import read_tensors

    model = LPIPS()
    params = dict(model.parameters_and_names())
    found = {}
    for path, key, rename, what in ((alexnet_path, alexnet_key, _alexnet_name, "AlexNet (torchvision "
                                     "alexnet-owt-7be5be79.pth)"),
                                    (heads_path, heads_key, lambda k: k if k.startswith("lin") else None,
                                     "LPIPS heads (lpips/weights/v0.1/alex.pth)")):
        if not path or not Path(path).is_file():
            raise FileNotFoundError(f"{key}={path} does not exist: LPIPS needs the {what} weights there")
        source = read_tensors(path)
        for name, shape in source.shapes.items():
            target = rename(name)
            if target in params:
                if tuple(shape) != tuple(params[target].shape):
                    raise ValueError(f"{path}: {name} has shape {list(shape)}, LPIPS expects "
                                     f"{list(params[target].shape)} for {target}")
                found[target] = (source, name)
    missing = [n for n in params if n not in found]
    if missing:
        raise ValueError(f"LPIPS weights incomplete: {len(missing)} tensors not found in {alexnet_path} / {heads_path}, "
                         f"e.g. {missing[:4]}")
    for target, (source, name) in found.items():
        params[target].set_data(ms.Tensor(np.ascontiguousarray(source.read(name), dtype=np.float32)))
    set_conv_impl(model, "auto")
    model.set_train(False)
    return model


class LpipsMetric:
    """LPIPS per frame of a clip pair: `__call__(ref, rec)` on float frames [T, H, W, 3] in [0, 1] -> [T]."""

    def __init__(self, alexnet_path, heads_path, batch_size: int = 16, **keys):
        self.model = load_lpips(alexnet_path, heads_path, **keys)
        self.batch_size = int(batch_size)

    def __call__(self, ref: np.ndarray, rec: np.ndarray) -> np.ndarray:
        from opensora.eval.clip import batched_call

        ref, rec = np.asarray(ref, np.float32), np.asarray(rec, np.float32)
        if ref.shape != rec.shape or ref.ndim != 4 or ref.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two clips [T, H, W, 3] of one shape, got {ref.shape} and {rec.shape}")
        if min(ref.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"LPIPS (AlexNet) needs frames of at least {MIN_SIZE}x{MIN_SIZE}, got "
                             f"{ref.shape[1]}x{ref.shape[2]}")
        x0 = ref.transpose(0, 3, 1, 2) * 2 - 1  # [T, H, W, 3] in [0, 1] -> [T, 3, H, W] in [-1, 1]
        x1 = rec.transpose(0, 3, 1, 2) * 2 - 1
        return batched_call(self.model, (x0, x1), self.batch_size).astype(np.float64)

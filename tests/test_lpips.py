"""LPIPS (AlexNet) in MindSpore against a PyTorch reference written from the lpips package's code
(tests/helpers.py), with random weights saved as torchvision / LPIPS state dicts in tmp_path.

Tolerance: |ours - torch| <= 1e-5 * max |torch| (float32; measured ~1e-7).
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import lpips_files, torch_lpips
from opensora.eval.lpips import LpipsMetric, load_lpips

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips")
    features, heads, _, _ = lpips_files(folder, head_scale=0.1)
    return features, heads, folder


def test_lpips_matches_the_torch_reference(weights):
    features, heads, folder = weights
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (3, 3, 64, 48)).astype(np.float32)
    x1 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        want = torch_lpips(features, heads, torch.from_numpy(x0), torch.from_numpy(x1)).numpy()
    model = load_lpips(folder / "alexnet.pth", folder / "alex.pth")
    import mindspore as ms

    got = model(ms.Tensor(x0), ms.Tensor(x1)).asnumpy()
    assert got.shape == (3,)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert want.min() > 0

    metric = LpipsMetric(folder / "alexnet.pth", folder / "alex.pth", batch_size=2)
    frames0, frames1 = (x0.transpose(0, 2, 3, 1) + 1) / 2, (x1.transpose(0, 2, 3, 1) + 1) / 2  # [T, H, W, 3] in [0, 1]
    per_frame = metric(frames0, frames1)
    np.testing.assert_allclose(per_frame, want, rtol=1e-4)  # the [0,1] -> [-1,1] map rounds differently
    np.testing.assert_allclose(metric(frames0, frames0), 0.0, atol=1e-7)


def test_lpips_state_dict_naming_and_errors(weights, tmp_path):
    features, heads, folder = weights
    # an LPIPS state dict (net.slice{k}.{i}.*, lin*) in one file serves as both
    slices = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]
    full = {f"net.slice{s + 1}.{i}.{p}": v for s, (a, b) in enumerate(slices) for i in range(a, b)
            for p, v in features[i].state_dict().items()}
    full.update(heads)
    full["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    torch.save(full, tmp_path / "lpips_full.pth")
    model = load_lpips(tmp_path / "lpips_full.pth", tmp_path / "lpips_full.pth")
    assert model is not None
    with pytest.raises(FileNotFoundError, match=r"task\.lpips\.alexnet_path=.*nope\.pth does not exist"):
        load_lpips(tmp_path / "nope.pth", folder / "alex.pth")
    with pytest.raises(ValueError, match="incomplete"):
        load_lpips(folder / "alexnet.pth", folder / "alexnet.pth")  # no heads in it
    with pytest.raises(ValueError, match="at least 31x31"):
        LpipsMetric(folder / "alexnet.pth", folder / "alex.pth")(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16, 3)))

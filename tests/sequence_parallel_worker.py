"""One rank of the sequence-parallel check in tests/test_sequence_parallel.py (run under msrun):

    msrun --worker_num=2 --local_worker_num=2 ... tests/sequence_parallel_worker.py OUT_DIR SEQUENCE_SIZE

Every rank builds the same tiny STDiT with random weights (all non-zero, so every branch matters) and
the same global batch. The reference is that model on the whole batch in this process; the
sequence-parallel copies (ulysses, with emulated AlltoAll, and allgather; each also with recompute)
run on this rank's rows (its data-parallel group's) and frames (its share in the group). Loss: the mean
of output * R over all elements (R random), so each rank's loss is the mean over its part. Rank 0
writes the largest differences to OUT_DIR/result.json: forward output (all ranks' parts reassembled),
parameter gradients (mean over all ranks, as training averages them) and the input gradient.
"""
import json
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from omegaconf import OmegaConf

from opensora.model import STDiT
from opensora.parallel import init_parallel
from opensora.parallel.sequence import apply_sequence_parallel, frame_shard

out_dir, sequence_size, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ms.set_context(mode={"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}[mode], device_target="CPU")
ctx = init_parallel(OmegaConf.create({"mode": "sequence", "sequence_size": sequence_size,
                                      "sequence_attention": "auto", "device_target": "CPU"}))

B, C, T, H, W, L, CC = 2, 2, 4, 4, 4, 3, 8  # per data-parallel group: 2 videos of 4 frames of 2x2 patches
SIZE = dict(input_size=(T, H, W), in_channels=C, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2,
            caption_channels=CC, model_max_length=L, class_dropout_prob=0.0)


def build(recompute=None):
    model = STDiT(**SIZE, recompute_blocks=recompute)
    rng = np.random.default_rng(0)  # the same weights on every rank and in every copy
    for name, p in model.parameters_and_names():
        p.set_data(ms.Tensor((0.2 * rng.standard_normal(p.shape)).astype(np.float32)))
    model.set_train(False)
    return model


class Loss(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, x, t, y, mask, r):
        out = self.model(x, t, y, mask)
        return (out * r).mean(), out


def loss_and_grads(model, *inputs):
    fn = ms.value_and_grad(Loss(model), (0,), model.trainable_params(), has_aux=True)
    (loss, out), (gx, gp) = fn(*[ms.Tensor(a) for a in inputs])
    return out.asnumpy(), float(loss.asnumpy()), gx.asnumpy(), [g.asnumpy() for g in gp]


rng = np.random.default_rng(1)
G = B * ctx.data_size  # global batch
x = rng.standard_normal((G, C, T, H, W)).astype(np.float32)
t = rng.integers(0, 1000, G).astype(np.int32)
y = rng.standard_normal((G, 1, L, CC)).astype(np.float32)
mask = np.ones((G, L), np.int32)
mask[0, 2:] = 0  # one caption with padding
r = rng.standard_normal((G, 2 * C, T, H, W)).astype(np.float32)

ref_out, ref_loss, ref_gx, ref_gp = loss_and_grads(build(), x, t, y, mask, r)

rows = slice(ctx.data_rank * B, (ctx.data_rank + 1) * B)
world_gather, world_sum = ops.AllGather(), ops.AllReduce()
result = {"world": ctx.world_size, "sequence_size": ctx.sequence_size}
import time
for kind, recompute in (("ulysses", None), ("allgather", "all")):
        tic = time.time()
        model = build(recompute)
        before = [(n, p.name) for n, p in model.parameters_and_names()]
        assert apply_sequence_parallel(model, ctx, kind) == kind
        names_kept = before == [(n, p.name) for n, p in model.parameters_and_names()]
        part = [frame_shard(x[rows], ctx), t[rows], y[rows], mask[rows], frame_shard(r[rows], ctx)]
        out, loss, gx, gp = loss_and_grads(model, *part)
        # forward: every rank's part, reassembled into the global batch
        outs = world_gather(ms.Tensor(out)).asnumpy().reshape(ctx.world_size, *out.shape)
        full = np.concatenate([np.concatenate(list(outs[g * ctx.sequence_size:(g + 1) * ctx.sequence_size]), axis=2)
                               for g in range(ctx.data_size)])
        gxs = world_gather(ms.Tensor(gx)).asnumpy().reshape(ctx.world_size, *gx.shape)
        full_gx = np.concatenate([np.concatenate(list(gxs[g * ctx.sequence_size:(g + 1) * ctx.sequence_size]), axis=2)
                                  for g in range(ctx.data_size)])
        # training averages over all ranks: loss and parameter gradients
        mean_loss = float(world_sum(ms.Tensor(loss)).asnumpy()) / ctx.world_size
        grads = [world_sum(ms.Tensor(g)).asnumpy() / ctx.world_size for g in gp]
        names = [n for n, p in model.parameters_and_names() if p.requires_grad]
        grad_err = {n: float(np.abs(g - rg).max() / (np.abs(rg).max() + 1e-12)) for n, g, rg in zip(names, grads, ref_gp)}
        worst = max(grad_err, key=grad_err.get)
        result[f"{kind}_recompute_{recompute}"] = {
            "out_max_abs_err": float(np.abs(full - ref_out).max()), "out_scale": float(np.abs(ref_out).max()),
            "loss": mean_loss, "ref_loss": ref_loss,
            # the input gradient of the full loss: each rank's frames, x world_size (its local loss
            # is world_size x its share of the mean over everything)
            "gx_rel_err": float(np.abs(full_gx / ctx.world_size - ref_gx).max() / np.abs(ref_gx).max()),
            "grad_rel_err_max": grad_err[worst], "grad_worst": worst, "n_grads": len(grads),
            "grad_norm": float(np.sqrt(sum((g ** 2).sum() for g in grads))),
            "ref_grad_norm": float(np.sqrt(sum((g ** 2).sum() for g in ref_gp))),
            "names_kept": names_kept, "seconds": time.time() - tic,
        }
if ctx.is_main:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))

"""End-to-end runs of the data pipeline through the real CLI (slow: each run compiles a tiny STDiT):
training from a folder of real videos with bad files in it, exact resume mid-epoch, and training
from cached text embeddings and video latents (task=embed_text, task=embed_video)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers import BAD, load_ckpt, make_media, run_cli

pytestmark = pytest.mark.slow

MODEL = ["model=stdit_tiny", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.class_dropout_prob=0"]


def data_args(csv):
    return ["data=video_csv", f"data.csv_path={csv}", "data.num_frames=4", "data.frame_interval=2",
            "data.image_size=16", "data.batch_size=2", "data.max_bad_fraction=0.6"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return make_media(tmp_path_factory.mktemp("media"))


def test_train_on_videos_skips_bad_files_and_resumes_mid_epoch(media, tmp_path):
    """8 rows (4 bad), batch 2: 4 batches per epoch. Run 6 steps with 2 loader workers, checkpoint at 3
    (mid-epoch); a copy resumed from step 3 with the loader in-process ends with the same weights and
    data position. Each bad file costs one log line and is counted in the summary."""
    args = [*data_args(media), *MODEL, "task.max_steps=6", "task.ckpt_every=3", "task.log_every=1", "task.eval=null",
            "optim/lr_schedule=constant", "logger=none"]
    ref = tmp_path / "ref"
    proc = run_cli([*args, "data.num_workers=2", f"hydra.run.dir={ref}"], tmp_path)
    out = proc.stdout + proc.stderr
    for name in BAD:
        assert out.count(f"skipping bad sample {media.parent / name}") == 1, name
    assert "data/bad_samples = 4" in out and "data: 4 bad sample(s) skipped" in out
    state3 = json.loads((ref / "checkpoints" / "step_000003" / "state.json").read_text())["data"]
    assert (state3["epoch"], state3["position"]) == (0, 6)
    state6 = json.loads((ref / "checkpoints" / "step_000006" / "state.json").read_text())["data"]
    assert (state6["epoch"], state6["position"]) == (1, 4) and state6["num_bad_samples"] == 4

    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    (resumed / "checkpoints" / "latest").write_text("step_000003\n")
    proc = run_cli([*args, "data.num_workers=0", f"resume={resumed}"], tmp_path)
    assert "resumed from" in proc.stdout + proc.stderr
    a = load_ckpt(ref / "checkpoints" / "step_000006" / "model.ckpt")
    b = load_ckpt(resumed / "checkpoints" / "step_000006" / "model.ckpt")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-4, err_msg=k)  # one other batch moves them ~lr
    sb = json.loads((resumed / "checkpoints" / "step_000006" / "state.json").read_text())
    assert (sb["data"]["epoch"], sb["data"]["position"]) == (1, 4) and sb["data"]["num_bad_samples"] == 4


def test_train_from_cached_embeddings_and_refuse_other_settings(media, tmp_path):
    text, latents = tmp_path / "cache" / "t5", tmp_path / "cache" / "vae"
    base = [*data_args(media), *MODEL, "logger=none"]
    run_cli([*base, "task=embed_text", f"data.text_embed_folder={text}", f"hydra.run.dir={tmp_path / 'et'}"], tmp_path)
    run_cli([*base, "task=embed_video", "data.num_workers=2", f"data.video_embed_folder={latents}",
             f"hydra.run.dir={tmp_path / 'ev'}"], tmp_path)
    assert (text / "clips" / "sub" / "small.npz").is_file() and (latents / "clips" / "wide.npz").is_file()
    assert (latents / "bad_videos.csv").is_file()

    cached = [f"data.text_embed_folder={text}", f"data.video_embed_folder={latents}"]
    run = tmp_path / "train"
    proc = run_cli([*base, *cached, "task.max_steps=2", "task.ckpt_every=2", "task.eval=null", "data.num_workers=0",
                    f"hydra.run.dir={run}"], tmp_path)
    assert (run / "checkpoints" / "step_000002" / "model.ckpt").is_file()
    assert not (run / "text_encoder").exists()  # the text encoder was not built (t5_tiny would save itself here)
    # 4 bad videos have no latent: skipped like unreadable videos
    assert "no video latent in" in proc.stdout + proc.stderr

    proc = run_cli([*base, *cached, "data.image_size=8", "task.max_steps=1", f"hydra.run.dir={tmp_path / 'x'}"],
                   tmp_path, check=False)
    assert proc.returncode != 0
    assert (f"data.video_embed_folder={latents} was built with different settings (image_size: cache [16, 16] vs "
            "config [8, 8])") in proc.stderr
    proc = run_cli([*base, *cached, "text_encoder.model_max_length=12", "task.max_steps=1",
                    f"hydra.run.dir={tmp_path / 'y'}"], tmp_path, check=False)
    assert proc.returncode != 0 and "model_max_length: cache 8 vs config 12" in proc.stderr

"""Convert task: original checkpoints -> MindSpore .ckpt files, checked by loading them back.

    python run.py task=convert task.component=model model=stdit_xl2 \
        model.pretrained=OpenSora-v1-16x256x256.pth task.output=models/OpenSora-v1-16x256x256.ckpt
    python run.py task=convert task.component=text_encoder text_encoder=t5_v1_1_xxl \
        task.output=models/t5-v1_1-xxl/model.ckpt
    python run.py task=convert task.component=vae vae=<sd vae config> task.output=models/sd-vae-ft-ema.ckpt

model: the tensors of `model.pretrained` that the model takes, in its layout (a 2-D patch conv gets
its time axis), under the original names; parameters the file does not have (e.g. the temporal
attention for a PixArt file) are left out, so loading the .ckpt leaves them at initialisation as
loading the original would. Load it with `model.pretrained=OUT.ckpt`.
text_encoder: the T5 encoder's parameters, written as `<folder>/model.ckpt`; the tokenizer and
config files of `text_encoder.from_pretrained` are copied beside it, so
`text_encoder=t5_folder text_encoder.from_pretrained=<folder>` loads it (without torch).
vae: the parameters of the VAE's MindSpore cell (`vae.module`), and its config.json beside them when
it has one (`vae.from_pretrained=OUT.ckpt` then loads it).

The output is written to a temporary file and renamed into place; with `task.verify` it is then
loaded back the way it will be used and every tensor compared (bit for bit) with what was saved.
"""
from __future__ import annotations

import gc
import hashlib
import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

import mindspore as ms

from opensora.tasks.common import build_model, record_run, run_dir
from opensora.utils.tensor_files import open_ms_checkpoint, save_ms_checkpoint, to_numpy

log = logging.getLogger(__name__)

T5_SIDE_FILES = ("config.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")


def digest(arr: np.ndarray) -> tuple:
    """(shape, dtype, sha1 of the bytes): equal digests mean bit-identical tensors."""
    arr = np.ascontiguousarray(arr)
    return tuple(arr.shape), str(arr.dtype), hashlib.sha1(arr.tobytes()).hexdigest()


def save_ckpt(params: Mapping[str, ms.Parameter], output: Path) -> dict[str, tuple]:
    """Write {name: tensor} as a MindSpore checkpoint (atomically); returns the digests of what was written."""
    save_ms_checkpoint(params, output)
    digests = {name: digest(to_numpy(p)) for name, p in params.items()}
    log.info("wrote %d tensors (%s values) to %s", len(params), f"{sum(int(p.size) for p in params.values()):,}",
             output)
    return digests


def compare(saved: Mapping[str, tuple], loaded: Mapping[str, np.ndarray], what: str) -> None:
    """Raise unless `loaded` holds exactly the saved tensors, bit for bit."""
    missing = [n for n in saved if n not in loaded]
    if missing:
        raise RuntimeError(f"{what}: {len(missing)} written tensors did not load back, first {missing[:5]}")
    different = [n for n in saved if digest(loaded[n]) != saved[n]]
    if different:
        raise RuntimeError(f"{what}: {len(different)} tensors differ from what was written, first {different[:5]}")
    log.info("verified: %s holds all %d written tensors unchanged", what, len(saved))


# ================================================================
# Components
# ================================================================


def convert_model(cfg: DictConfig, output: Path) -> dict[str, tuple]:
    from opensora.model.pretrained import load_pretrained

    source = cfg.model.get("pretrained")
    if not source:
        raise ValueError("task=convert task.component=model needs model.pretrained=PATH (the original checkpoint, "
                         "e.g. OpenSora-v1-16x256x256.pth or PixArt-XL-2-512x512.pth) and the matching model config "
                         "(model=stdit_xl2)")
    model = build_model(cfg, with_pretrained=False)
    report = load_pretrained(model, source)
    if report.missing:
        log.info("%d model parameters are not in %s and are left out of the .ckpt (they stay at "
                 "initialisation when it is loaded)", len(report.missing), source)
    loaded = set(report.loaded)
    params = {n: p for n, p in model.parameters_and_names() if n in loaded}
    return save_ckpt(params, output)


def verify_model(cfg: DictConfig, output: Path, saved: Mapping[str, tuple]) -> None:
    from opensora.model.pretrained import load_pretrained

    model = build_model(cfg, with_pretrained=False)
    load_pretrained(model, output, logger=None)
    compare(saved, {n: to_numpy(p) for n, p in model.parameters_and_names()}, f"model loaded from {output}")


def _t5_folder(cfg: DictConfig, output: Path) -> Path:
    source = cfg.text_encoder.get("from_pretrained")
    if not source:
        raise ValueError("task=convert task.component=text_encoder needs text_encoder.from_pretrained=FOLDER (a "
                         "Hugging Face T5 folder: config.json, spiece.model, weights)")
    if output.name != "model.ckpt":
        raise ValueError(f"task.output={output}: a converted T5 encoder is a folder's model.ckpt (the file name a T5 "
                         f"folder's weights are looked up by), e.g. task.output={output.parent / 'model.ckpt'}")
    return Path(source)


def convert_text_encoder(cfg: DictConfig, output: Path) -> dict[str, tuple]:
    source = _t5_folder(cfg, output)
    folder = output.parent
    mine, theirs = folder / "config.json", source / "config.json"
    if folder.resolve() != source.resolve() and mine.is_file() and theirs.is_file() and \
            json.loads(mine.read_text()) != json.loads(theirs.read_text()):
        raise FileExistsError(f"{mine} exists and is not the config of {source}; write the encoder to its own folder")
    encoder = instantiate(cfg.text_encoder)
    digests = save_ckpt(dict(encoder.model.parameters_and_names()), output)
    if folder.resolve() != source.resolve():
        for name in T5_SIDE_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
        log.info("copied the tokenizer and config files of %s to %s", source, folder)
    spiece = folder / "spiece.model"
    if not spiece.is_file() or not spiece.samefile(encoder.tokenizer.path):  # the tokenizer actually used
        shutil.copyfile(encoder.tokenizer.path, spiece)
    return digests


def verify_text_encoder(cfg: DictConfig, output: Path, saved: Mapping[str, tuple]) -> None:
    folder = output.parent
    spec = OmegaConf.to_container(cfg.text_encoder, resolve=True)
    spec.update(from_pretrained=str(folder), tokenizer_path=None, config=None)
    encoder = instantiate(spec)
    used = [str(f) for f in encoder.load_report.files]
    if used != [str(output)]:
        # the folder prefers safetensors: check the file itself, and say which one loads
        log.warning("%s also holds %s, which T5Embedder(from_pretrained=%s) prefers over model.ckpt", folder, used,
                    folder)
        compare(saved, open_ms_checkpoint(output).load(), str(output))
        return
    compare(saved, {n: to_numpy(p) for n, p in encoder.model.parameters_and_names()},
            f"T5 encoder loaded from {folder}")


def convert_vae(cfg: DictConfig, output: Path) -> dict[str, tuple]:
    vae = instantiate(cfg.vae)
    module = getattr(vae, "module", None)
    if not isinstance(module, ms.nn.Cell):
        raise ValueError(f"vae {cfg.vae._target_} has no MindSpore weights to convert (task.component=vae converts "
                         "VAEs whose `.module` is a MindSpore cell, such as the SD VAE)")
    to_dict = getattr(getattr(vae, "config", None), "to_dict", None)
    config_file = output.parent / "config.json"
    if to_dict is not None:  # the VAE reads a weights file's config from config.json beside it
        text = json.dumps(to_dict(), indent=2)
        if config_file.is_file() and json.loads(config_file.read_text()) != json.loads(text):
            raise FileExistsError(f"{config_file} exists and is not this VAE's config; write the VAE to its own "
                                  f"folder (task.output=<folder>/{output.name})")
    digests = save_ckpt(dict(module.parameters_and_names()), output)
    if to_dict is not None:
        config_file.write_text(text)
        log.info("wrote the VAE config beside it: %s", config_file)
    return digests


def verify_vae(cfg: DictConfig, output: Path, saved: Mapping[str, tuple]) -> None:
    spec = OmegaConf.to_container(cfg.vae, resolve=True)
    if "from_pretrained" not in inspect.signature(get_class(spec["_target_"])).parameters:
        # a VAE that cannot load a file: check the file itself
        compare(saved, {n: to_numpy(p) for n, p in ms.load_checkpoint(str(output)).items()}, str(output))
        return
    spec.update(from_pretrained=str(output), config=None)
    vae = instantiate(spec)
    compare(saved, {n: to_numpy(p) for n, p in vae.module.parameters_and_names()}, f"VAE loaded from {output}")


CONVERTERS = {"model": (convert_model, verify_model), "text_encoder": (convert_text_encoder, verify_text_encoder),
              "vae": (convert_vae, verify_vae)}


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    if task.component not in CONVERTERS:
        raise ValueError(f"task.component={task.component!r}: expected one of {list(CONVERTERS)}")
    output = Path(task.output)
    if output.suffix != ".ckpt":
        raise ValueError(f"task.output={output}: the output is a MindSpore checkpoint, name it *.ckpt")
    record_run(cfg, run_dir(cfg))
    convert, verify = CONVERTERS[task.component]
    saved = convert(cfg, output)
    gc.collect()  # the converted component is gone: loading back does not hold two copies
    if task.verify:
        verify(cfg, output, saved)
    print(f"converted {task.component}: {len(saved)} tensors -> {output}", flush=True)
    return {"convert/tensors": len(saved)}

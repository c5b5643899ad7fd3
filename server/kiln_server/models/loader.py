"""Load an SDXL-family model from a folder in the diffusers layout.

The same code loads Kiln's embedded model and a real SDXL base checkpoint: `model_index.json`
plus `unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`,
`scheduler/`. An optional `kiln.json` carries Kiln's serving defaults for the model, and an
optional `preview_decoder/` (a diffusers AutoencoderTiny folder) its learned preview decoder.

A single-file checkpoint (`checkpoint`, see models/single_file.py) replaces the weights of
the UNet, VAE and text encoders; the folder then gives everything else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln_server.atomic_files import write_atomic
from kiln_server.engines.components import ModelDims

log = logging.getLogger(__name__)

# Kiln never reaches a model hub: every model is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REQUIRED_SUBFOLDERS = (
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)
PREVIEW_DECODER_SUBFOLDER = "preview_decoder"


class ModelFolderError(ValueError):
    """The folder is not a loadable SDXL model; the message names what is wrong."""


@dataclass
class SDXLModules:
    """The torch modules of one model, in eval mode on the CPU.

    `preview_decoder` is the learned preview decoder (an AutoencoderTiny) or None.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    preview_decoder: Any = None


@dataclass
class SDXLModelFiles:
    """Everything read from a model folder that the pipeline and engines need."""

    path: Path
    tokenizer: Any
    tokenizer_2: Any
    scheduler_config: dict[str, Any]
    dims: ModelDims
    vae_scaling_factor: float
    kiln_config: dict[str, Any] = field(default_factory=dict)
    force_zeros_for_empty_prompt: bool = True
    # The VAE overflows in fp16 and must decode in fp32 (SDXL base's VAE says so).
    vae_force_upcast: bool = True
    # The AutoencoderTiny folder of the model's learned preview decoder; None: it has none.
    preview_decoder_path: Path | None = None
    # The single-file checkpoint whose weights replace the folder's networks; None: the
    # folder's own weights.
    checkpoint: Path | None = None

    @property
    def source(self) -> Path:
        """Where the model's network weights come from: the checkpoint, else the folder."""
        return self.checkpoint or self.path


def check_model_folder(path: Path) -> None:
    """Raise ModelFolderError naming the first missing piece of an SDXL folder."""
    if path.is_file():
        raise ModelFolderError(
            f"{path} is a file, not a diffusers model folder: name a single-file checkpoint "
            "in a config's [[models]] entry as `checkpoint` with its `config_folder`, and "
            "pass that config (`kiln build-engines --config FILE --model NAME`)"
        )
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist")
    if not (path / "model_index.json").is_file():
        raise ModelFolderError(f"{path} has no model_index.json: not a diffusers model folder")
    missing = [name for name in REQUIRED_SUBFOLDERS if not (path / name).is_dir()]
    if missing:
        raise ModelFolderError(
            f"{path} lacks {', '.join(missing)}: "
            f"an SDXL folder needs {', '.join(REQUIRED_SUBFOLDERS)}"
        )


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ModelFolderError naming the file when it is unreadable
    or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} must hold a JSON object")
    return data


def find_preview_decoder(path: Path, override: Path | None = None) -> Path | None:
    """The preview decoder folder of the model in `path`: `override` when given (it must
    be an AutoencoderTiny folder, else ModelFolderError), else the model's own
    `preview_decoder/` when present, else None."""
    if override is not None:
        if not (override / "config.json").is_file():
            raise ModelFolderError(
                f"preview_decoder {override} is not a diffusers AutoencoderTiny folder "
                "(no config.json); point it at a local folder such as madebyollin/taesdxl"
            )
        return override
    own = path / PREVIEW_DECODER_SUBFOLDER
    return own if (own / "config.json").is_file() else None


def read_model_files(
    path: Path, preview_decoder: Path | None = None, *, checkpoint: Path | None = None
) -> SDXLModelFiles:
    """Read tokenizers and configs (no weights) and derive the model's dims.

    `preview_decoder` names a preview decoder folder outside the model's (a config's
    `preview_decoder` key); by default the model's own `preview_decoder/` is used if any.
    With `checkpoint`, a single-file SDXL checkpoint supplies the network weights and
    `path` is its config folder; the checkpoint's layout and shapes are checked against
    the folder's configs (CheckpointError otherwise).
    """
    from transformers import CLIPTokenizer

    if checkpoint is not None:
        from kiln_server.models.single_file import check_checkpoint

        check_checkpoint(checkpoint, path)
    check_model_folder(path)
    decoder_path = find_preview_decoder(path, preview_decoder)
    index = read_json(path / "model_index.json")
    text_config = read_json(path / "text_encoder" / "config.json")
    text_config_2 = read_json(path / "text_encoder_2" / "config.json")
    unet_config = read_json(path / "unet" / "config.json")
    vae_config = read_json(path / "vae" / "config.json")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(path / "tokenizer_2")
    addition_dim = int(unet_config.get("addition_time_embed_dim") or 0)
    projection_dim = int(unet_config.get("projection_class_embeddings_input_dim") or 0)
    if unet_config.get("addition_embed_type") != "text_time" or not addition_dim:
        raise ModelFolderError(
            f"{path / 'unet'} is not an SDXL UNet: it lacks the text_time added conditioning"
        )
    latent_channels = int(vae_config.get("latent_channels", 4))
    unet_in_channels = int(unet_config["in_channels"])
    if unet_in_channels not in (latent_channels, 2 * latent_channels + 1):
        raise ModelFolderError(
            f"{path / 'unet'} takes {unet_in_channels} input channels; Kiln serves UNets "
            f"with the VAE's {latent_channels} latent channels, or {2 * latent_channels + 1} "
            "for an inpainting UNet (latents, mask and masked-photo latents)"
        )
    dims = ModelDims(
        latent_channels=latent_channels,
        unet_in_channels=unet_in_channels,
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        text_hidden_size=int(text_config["hidden_size"]),
        text_hidden_size_2=int(text_config_2["hidden_size"]),
        pooled_dim=int(text_config_2.get("projection_dim") or text_config_2["hidden_size"]),
        max_tokens=int(tokenizer.model_max_length),
        num_time_ids=(projection_dim - int(text_config_2.get("projection_dim") or 0))
        // addition_dim,
        unet_downsamples=len(unet_config["block_out_channels"]) - 1,
    )
    kiln_file = path / "kiln.json"
    return SDXLModelFiles(
        path=path,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler_config=read_json(scheduler_file),
        dims=dims,
        vae_scaling_factor=float(vae_config.get("scaling_factor", 0.13025)),
        kiln_config=read_json(kiln_file) if kiln_file.is_file() else {},
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        vae_force_upcast=bool(vae_config.get("force_upcast", True)),
        preview_decoder_path=decoder_path,
        checkpoint=checkpoint,
    )


def load_modules(
    path: Path,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    *,
    preview_decoder: Path | None = None,
    checkpoint: Path | None = None,
) -> SDXLModules:
    """Load the networks' weights from the folder onto the CPU, in eval mode.

    UNet and text encoders load in `dtype`, the VAE in `vae_dtype` (default `dtype`), so
    an fp16 model is never materialized in fp32 on the way to the GPU. The preview decoder
    (`find_preview_decoder(path, preview_decoder)`) loads as an AutoencoderTiny in `dtype`
    when there is one. With `checkpoint`, the UNet, VAE and text encoders come from that
    single-file checkpoint, converted against the folder's configs (see
    models/single_file.py), and the folder's own network weights are not read.
    """
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    check_model_folder(path)
    quiet_library_progress()
    if checkpoint is not None:
        from kiln_server.models.single_file import load_checkpoint_networks

        modules = SDXLModules(
            **load_checkpoint_networks(checkpoint, path, dtype, vae_dtype or dtype)
        )
    else:
        modules = SDXLModules(
            unet=UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype),
            vae=AutoencoderKL.from_pretrained(path / "vae", torch_dtype=vae_dtype or dtype),
            text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                path / "text_encoder_2", dtype=dtype
            ),
        )
    decoder_path = find_preview_decoder(path, preview_decoder)
    if decoder_path is not None:
        modules.preview_decoder = AutoencoderTiny.from_pretrained(decoder_path, torch_dtype=dtype)
    for module in (
        modules.unet,
        modules.vae,
        modules.text_encoder,
        modules.text_encoder_2,
        modules.preview_decoder,
    ):
        if module is not None:
            module.eval().requires_grad_(False)
    return modules


def quiet_library_progress() -> None:
    """Silence diffusers' and transformers' own progress bars (Kiln logs its own steps)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


HASH_CACHE_FILE_NAME = "content-hashes.json"
HASH_CACHE_VERSION = 1
# A file modified this shortly before hashing began could change again within the
# filesystem's timestamp granularity (up to 2 s on FAT) and keep its size and mtime; such
# a hash is not remembered.
RACY_WINDOW_NS = 2_000_000_000


def default_hash_cache_file() -> Path:
    """Where model_content_hash remembers hashes: content-hashes.json in the Kiln cache dir."""
    # Imported here: registry sits above the loader (it builds models), not beside it.
    from kiln_server.models.registry import default_cache_dir

    return default_cache_dir() / HASH_CACHE_FILE_NAME


# A checkpoint model's config folder: only these files of the networks it replaces count.
_REPLACED_NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _hashed_files(path: Path, checkpoint: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, file) of every file the content hash covers, in hashing order.

    With `checkpoint`, that file (as `checkpoint.safetensors`) and the folder's files under
    `config/`, less the weights of the networks the checkpoint replaces.
    """
    files = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".") or rel == "kiln.json":
            continue
        if checkpoint is None:
            files.append((rel, file))
        elif rel.split("/")[0] not in _REPLACED_NETWORKS or rel.endswith("/config.json"):
            files.append((f"config/{rel}", file))
    return [("checkpoint.safetensors", checkpoint), *files] if checkpoint else files


def _read_hash_cache(cache_file: Path) -> dict[str, Any]:
    """The cached folder entries, or {} when the file is missing, unreadable or corrupt."""
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != HASH_CACHE_VERSION:
        return {}
    folders = data.get("folders")
    return folders if isinstance(folders, dict) else {}


def _store_hash(cache_file: Path, folder: str, entry: dict[str, Any]) -> None:
    """Add one folder's entry to the cache file, atomically; failures only log a warning.

    Re-reads the file just before writing, so entries other processes added meanwhile
    survive, and drops entries of folders that no longer exist.
    """
    folders = {
        key: value
        for key, value in _read_hash_cache(cache_file).items()
        if all(Path(part).exists() for part in key.split(os.pathsep))
    }
    folders[folder] = entry
    text = json.dumps({"version": HASH_CACHE_VERSION, "folders": folders}, indent=1)
    try:
        write_atomic(cache_file, text)
    except OSError as exc:
        log.warning("cannot write the hash cache %s: %s", cache_file, exc)


def model_content_hash(
    path: Path,
    cache_file: Path | None = None,
    *,
    use_cache: bool = True,
    checkpoint: Path | None = None,
) -> str:
    """SHA-256 over every weight and config file of the folder (relative paths included);
    with `checkpoint`, over the checkpoint and the config files `path` gives it.

    Engine manifests record it, so engines built from other weights are refused. The value
    depends only on the files' names and contents, never on the cache: it is remembered in
    `cache_file` (default: default_hash_cache_file()) under the folder's resolved path
    (with a checkpoint: the checkpoint's and the folder's, joined by os.pathsep) together
    with each file's relative path, size and mtime_ns, and reused while all of those
    match, so an unchanged folder is not read again. Any added, removed or changed file
    re-hashes the folder. A missing or corrupt cache is ignored and rewritten; one that
    cannot be written only costs the next start a re-hash. `use_cache=False` always reads.
    """
    started_ns = time.time_ns()
    files = _hashed_files(path, checkpoint)
    stamps: list[list[str | int]] = []
    newest_ns = 0
    for rel, file in files:
        stat = file.stat()
        stamps.append([rel, stat.st_size, stat.st_mtime_ns])
        newest_ns = max(newest_ns, stat.st_mtime_ns)
    folder = str(path.resolve())
    if checkpoint is not None:
        folder = os.pathsep.join((str(checkpoint.resolve()), folder))
    cache = (cache_file or default_hash_cache_file()) if use_cache else None
    if cache is not None:
        entry = _read_hash_cache(cache).get(folder)
        if isinstance(entry, dict) and entry.get("files") == stamps:
            cached = entry.get("sha256")
            if isinstance(cached, str):
                return cached
    digest = hashlib.sha256()
    for rel, file in files:
        digest.update(rel.encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    content_hash = digest.hexdigest()
    if cache is not None and newest_ns < started_ns - RACY_WINDOW_NS:
        _store_hash(cache, folder, {"files": stamps, "sha256": content_hash})
    return content_hash

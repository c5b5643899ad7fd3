"""The models a server offers: names, folders, serving defaults and limits.

A TOML config lists models (`[[models]]` tables); without one the registry holds just the
embedded default model. Defaults come from, in order: the config entry, the model folder's
kiln.json, and Kiln's built-in fallbacks. A model is a diffusers folder (`path`), a
built-in (`builtin`), or a single-file checkpoint (`checkpoint`) with the diffusers folder
that gives its configs (`config_folder`, which then acts as its model folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from kiln_server.models.sdxl_base_arch import SDXL_BASE_ARCH_NAME, ensure_sdxl_base_arch
from kiln_server.models.tiny_flux import ensure_tiny_flux, tiny_flux_name
from kiln_server.models.tiny_sdxl import TINY_SDXL_NAME, ensure_tiny_sdxl
from kiln_server.pipeline.params import GenerationParams

REPO_ROOT = Path(__file__).resolve().parents[3]
SHIPPED_MODEL_NAME = "kiln-shapes"
# The FLUX-architecture model trained by the project, shipped beside kiln-shapes.
SHIPPED_FLUX_MODEL_NAME = "kiln-flux-shapes"
SHIPPED_MODELS = (SHIPPED_MODEL_NAME, SHIPPED_FLUX_MODEL_NAME)
TINY_FLUX_DEV_NAME = tiny_flux_name(guidance=True)
TINY_FLUX_SCHNELL_NAME = tiny_flux_name(guidance=False)
BUILTIN_MODELS = (
    SHIPPED_MODEL_NAME,
    SHIPPED_FLUX_MODEL_NAME,
    TINY_SDXL_NAME,
    SDXL_BASE_ARCH_NAME,
    TINY_FLUX_DEV_NAME,
    TINY_FLUX_SCHNELL_NAME,
)


class RegistryError(ValueError):
    """The model configuration is invalid; the message names the entry and the field."""


@dataclass(frozen=True)
class ModelSpec:
    """One servable model with its defaults and request limits.

    `path` is the model's diffusers folder; for a single-file model (`checkpoint` set) it
    is the config folder, which gives everything but the networks' weights: configs,
    tokenizers, scheduler, kiln.json defaults, preview decoder and `loras/`.
    """

    name: str
    path: Path
    family: str = "sdxl"
    # What the model is, for ListModels (e.g. that a benchmark model draws noise).
    description: str = ""
    default_width: int = 1024
    default_height: int = 1024
    default_num_inference_steps: int = 30
    default_guidance_scale: float = 7.5
    default_scheduler: str = "K_EULER"
    # The negative prompt a request without one gets (None: none). On a FLUX model without
    # distilled guidance a negative prompt turns guidance_scale into true CFG, so a model
    # trained for CFG against the empty prompt sets "" here (kiln-flux-shapes does).
    default_negative_prompt: str | None = None
    min_size: int = 256
    max_size: int = 2048
    max_num_inference_steps: int = 150
    max_num_outputs: int = 8
    max_guidance_scale: float = 50.0
    # Image conditioning: the strength a request without one gets (Replicate's
    # prompt_strength default).
    default_strength: float = 0.8
    # None: the server-wide setting (`--max-batch-rows`, KILN_MAX_BATCH_ROWS) applies.
    max_batch_rows: int | None = None
    # A local AutoencoderTiny folder (e.g. madebyollin/taesdxl) to preview with instead of
    # the model folder's own `preview_decoder/`; None: the folder's own, if any.
    preview_decoder: Path | None = None
    # Folders whose .safetensors files requests may name in `loras`: the config's
    # `lora_dirs` (relative to the config file), then the model folder's own `loras/`.
    lora_dirs: tuple[Path, ...] = ()
    # A single-file SDXL checkpoint (original layout) whose weights replace the folder's.
    checkpoint: Path | None = None

    @property
    def source(self) -> Path:
        """Where the model's weights come from: its checkpoint, else its folder."""
        return self.checkpoint or self.path

    def default_request(self, prompt: str, **overrides: Any) -> GenerationParams:
        """This model's default request for `prompt`: its default size, steps, guidance and
        scheduler, with any GenerationParams field replaced by `overrides`."""
        params = GenerationParams(
            prompt=prompt,
            width=self.default_width,
            height=self.default_height,
            num_inference_steps=self.default_num_inference_steps,
            guidance_scale=self.default_guidance_scale,
            scheduler=self.default_scheduler,
            negative_prompt=self.default_negative_prompt,
            model=self.name,
        )
        return replace(params, **overrides)


SPEC_KEYS = {f.name for f in fields(ModelSpec)} - {"name", "path"}


def default_cache_dir() -> Path:
    """Where built models and engines are cached: $KILN_CACHE_DIR or ~/.cache/kiln."""
    return Path(os.environ.get("KILN_CACHE_DIR", "~/.cache/kiln")).expanduser()


def shipped_model_dir(name: str = SHIPPED_MODEL_NAME) -> Path:
    """Folder of a trained model shipped in the repository, kiln-shapes by default
    ($KILN_MODELS_DIR overrides the folder they are in)."""
    base = Path(os.environ.get("KILN_MODELS_DIR", REPO_ROOT / "models"))
    return base / name


def builtin_model_path(name: str, cache_dir: Path) -> Path:
    """Folder of a built-in model, generating a random-weight one into the cache on first use.

    `kiln-sdxl-base-arch` (SDXL base 1.0's full architecture, ~7 GB) takes minutes to
    generate on a CPU; it is generated once and reused while current.
    """
    if name in SHIPPED_MODELS:
        folder = shipped_model_dir(name)
        if not (folder / "model_index.json").is_file():
            trainer = "flux_train" if name == SHIPPED_FLUX_MODEL_NAME else "train"
            raise RegistryError(
                f"the shipped model {name} is missing from {folder}; "
                f"train it with `python -m kiln_training.{trainer}` (see training/README.md)"
            )
        return folder
    if name == TINY_SDXL_NAME:
        return ensure_tiny_sdxl(cache_dir / "models")
    if name == SDXL_BASE_ARCH_NAME:
        return ensure_sdxl_base_arch(cache_dir / "models")
    if name in (TINY_FLUX_DEV_NAME, TINY_FLUX_SCHNELL_NAME):
        return ensure_tiny_flux(cache_dir / "models", guidance=name == TINY_FLUX_DEV_NAME)
    raise RegistryError(f"unknown built-in model {name!r}; built-ins are {list(BUILTIN_MODELS)}")


def default_builtin_name() -> str:
    """The trained shipped model when present, else the tiny random-weight model."""
    if (shipped_model_dir() / "model_index.json").is_file():
        return SHIPPED_MODEL_NAME
    return TINY_SDXL_NAME


def _folder_defaults(path: Path) -> dict[str, Any]:
    import json

    kiln_file = path / "kiln.json"
    if not kiln_file.is_file():
        return {}
    data = json.loads(kiln_file.read_text())
    # Folders outside the model folder are the server config's to name, not the folder's.
    return {
        k: v
        for k, v in data.items()
        if k in SPEC_KEYS and k not in ("preview_decoder", "lora_dirs", "checkpoint")
    }


def _family_defaults(name: str, path: Path, checkpoint: Any) -> dict[str, Any]:
    """The family of the folder (from its model_index.json; a folder without one, or a
    single-file checkpoint, is SDXL) and that family's serving defaults: FLUX.1-dev's for
    a FLUX model with a guidance embedding (28 steps, distilled guidance 3.5), schnell's
    without one (4 steps, guidance 1: off), both FLOW_MATCH_EULER."""
    if checkpoint is not None or not (path / "model_index.json").is_file():
        return {}
    from kiln_server.models.family import model_family
    from kiln_server.models.loader import ModelFolderError

    try:
        family = model_family(path)
    except ModelFolderError as exc:
        raise RegistryError(f"model {name!r}: {exc}") from exc
    if family != "flux":
        return {"family": family}
    distilled = _flux_distilled(name, path)
    return {
        "family": "flux",
        "default_scheduler": "FLOW_MATCH_EULER",
        "default_num_inference_steps": 28 if distilled else 4,
        "default_guidance_scale": 3.5 if distilled else 1.0,
        "max_num_inference_steps": 50,
        "max_guidance_scale": 10.0,
    }


def _flux_distilled(name: str, path: Path) -> bool:
    """Whether the FLUX model in `path` embeds distilled guidance (dev-style); RegistryError
    naming the model when its transformer config cannot be read."""
    from kiln_server.models.loader import ModelFolderError, read_json

    try:
        transformer = read_json(path / "transformer" / "config.json")
    except ModelFolderError as exc:
        raise RegistryError(f"model {name!r}: {exc}") from exc
    return bool(transformer.get("guidance_embeds", False))


def make_spec(name: str, path: Path, overrides: dict[str, Any]) -> ModelSpec:
    """A ModelSpec from the family's defaults, the folder's kiln.json and explicit
    overrides (later ones win)."""
    unknown = set(overrides) - SPEC_KEYS
    if unknown:
        raise RegistryError(
            f"model {name!r}: unknown setting(s) {sorted(unknown)}; known: {sorted(SPEC_KEYS)}"
        )
    values = {
        **_family_defaults(name, path, overrides.get("checkpoint")),
        **_folder_defaults(path),
        **overrides,
    }
    own_loras = path / "loras"
    lora_dirs = tuple(values.pop("lora_dirs", ()))
    if own_loras.is_dir() and own_loras not in lora_dirs:
        lora_dirs += (own_loras,)
    spec = ModelSpec(name=name, path=path, lora_dirs=lora_dirs, **values)
    for size_field in ("default_width", "default_height", "min_size", "max_size"):
        if getattr(spec, size_field) % 8:
            raise RegistryError(f"model {name!r}: {size_field} must be a multiple of 8")
    negative = spec.default_negative_prompt
    if negative is not None and spec.family == "flux" and _flux_distilled(name, path):
        raise RegistryError(
            f"model {name!r}: default_negative_prompt is set, but the model embeds "
            "distilled guidance and takes no negative prompt; remove the setting"
        )
    return spec


def _resolve(base: Path, value: Any) -> Path:
    """A config path: `~` expanded, relative ones against the config file's folder."""
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _check_checkpoint(spec: ModelSpec) -> None:
    """RegistryError naming the model when its checkpoint cannot be served (a header and
    config read; no weights are loaded)."""
    if spec.checkpoint is None:
        return
    from kiln_server.models.single_file import CheckpointError, check_checkpoint

    try:
        check_checkpoint(spec.checkpoint, spec.path)
    except CheckpointError as exc:
        raise RegistryError(f"model {spec.name!r}: {exc}") from exc


@dataclass
class ModelRegistry:
    """Served models by name, and which one an empty `model` field selects."""

    models: dict[str, ModelSpec]
    default_model: str

    def get(self, name: str) -> ModelSpec | None:
        """The spec for `name` ('' selects the default), or None when unknown."""
        return self.models.get(name or self.default_model)

    @classmethod
    def from_config(cls, config: dict[str, Any], cache_dir: Path) -> ModelRegistry:
        """Build from a parsed TOML config (its `models` list and `server.default_model`).

        Each entry has `name` and one of `path` (a diffusers SDXL folder, relative paths
        resolved against the config's directory via `_config_dir`), `builtin`, or
        `checkpoint` (a single-file SDXL .safetensors in the original layout) with
        `config_folder` (the diffusers folder giving its configs), both resolved like
        `path`; a checkpoint is checked against its config folder here (header and configs
        only). An entry may name a `preview_decoder` folder and `lora_dirs` (resolved like
        `path`).
        """
        entries = config.get("models") or []
        if not isinstance(entries, list):
            raise RegistryError("`models` must be a list of [[models]] tables")
        base = Path(config.get("_config_dir", "."))
        models: dict[str, ModelSpec] = {}
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not entry.get("name"):
                raise RegistryError(f"models[{index}] needs a `name`")
            entry = dict(entry)
            name = str(entry.pop("name"))
            if name in models:
                raise RegistryError(f"model {name!r} is listed twice")
            sources = [key for key in ("path", "builtin", "checkpoint") if key in entry]
            if len(sources) > 1:
                raise RegistryError(
                    f"model {name!r} names {' and '.join(f'`{k}`' for k in sources)}; give one"
                )
            if "config_folder" in entry and "checkpoint" not in entry:
                raise RegistryError(
                    f"model {name!r}: `config_folder` goes with `checkpoint` (a single-file "
                    "checkpoint); a diffusers folder in `path` has its own configs"
                )
            if "path" in entry:
                path = _resolve(base, entry.pop("path"))
                if path.is_file():
                    raise RegistryError(
                        f"model {name!r}: path {path} is a file; `path` names a diffusers "
                        'folder: give a single-file checkpoint as `checkpoint = "FILE"` '
                        'with `config_folder = "FOLDER"`'
                    )
            elif "builtin" in entry:
                path = builtin_model_path(str(entry.pop("builtin")), cache_dir)
            elif "checkpoint" in entry:
                if "config_folder" not in entry:
                    raise RegistryError(
                        f"model {name!r}: `checkpoint` needs `config_folder`, the local "
                        "diffusers SDXL folder that gives the checkpoint's configs, "
                        "tokenizers and scheduler (e.g. the base model it was fine-tuned from)"
                    )
                entry["checkpoint"] = _resolve(base, entry.pop("checkpoint"))
                path = _resolve(base, entry.pop("config_folder"))
            else:
                raise RegistryError(f"model {name!r} needs `path`, `builtin` or `checkpoint`")
            if "preview_decoder" in entry:
                entry["preview_decoder"] = _resolve(base, entry.pop("preview_decoder"))
            if "lora_dirs" in entry:
                folders = entry.pop("lora_dirs")
                if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
                    raise RegistryError(f"model {name!r}: lora_dirs must be a list of folders")
                entry["lora_dirs"] = tuple(_resolve(base, folder) for folder in folders)
            models[name] = make_spec(name, path, entry)
            _check_checkpoint(models[name])
        if not models:
            name = default_builtin_name()
            models[name] = make_spec(name, builtin_model_path(name, cache_dir), {})
        server = config.get("server") or {}
        default = str(server.get("default_model") or next(iter(models)))
        if default not in models:
            raise RegistryError(
                f"server.default_model {default!r} is not among the models {sorted(models)}"
            )
        return cls(models=models, default_model=default)

"""Which model family a diffusers folder holds: "sdxl" or "flux".

The answer comes from `model_index.json`'s `_class_name` (the pipeline class diffusers
would build), so a real SDXL or FLUX.1 folder and Kiln's own models are told apart the same
way; an index without a class name falls back to the denoiser's subfolder (`unet/` for
SDXL, `transformer/` for FLUX).
"""

from __future__ import annotations

from pathlib import Path

from kiln_server.models.loader import ModelFolderError, read_json

SDXL = "sdxl"
FLUX = "flux"
FAMILIES = (SDXL, FLUX)

PIPELINE_FAMILIES = {
    "StableDiffusionXLPipeline": SDXL,
    "StableDiffusionXLImg2ImgPipeline": SDXL,
    "StableDiffusionXLInpaintPipeline": SDXL,
    "FluxPipeline": FLUX,
    "FluxImg2ImgPipeline": FLUX,
    "FluxInpaintPipeline": FLUX,
}
DENOISER_FAMILIES = {"unet": SDXL, "transformer": FLUX}


def model_family(folder: Path) -> str:
    """ "sdxl" or "flux" for the diffusers folder `folder`; ModelFolderError naming the
    file and what it holds when the folder is neither (or not a diffusers folder)."""
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist or is not a folder")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelFolderError(
            f"{folder} has no model_index.json: not a diffusers model folder "
            "(Kiln serves SDXL and FLUX folders in the diffusers layout)"
        )
    class_name = read_json(index_file).get("_class_name")
    if class_name is not None:
        family = PIPELINE_FAMILIES.get(str(class_name))
        if family is None:
            known = ", ".join(sorted(PIPELINE_FAMILIES))
            raise ModelFolderError(
                f"{index_file} names pipeline class {class_name!r}; Kiln serves the SDXL and "
                f"FLUX families ({known})"
            )
        return family
    found = [family for name, family in DENOISER_FAMILIES.items() if (folder / name).is_dir()]
    if len(found) != 1:
        raise ModelFolderError(
            f"{index_file} has no _class_name and {folder} has "
            f"{'both' if found else 'neither'} unet/ and transformer/: cannot tell SDXL "
            "from FLUX; set _class_name to StableDiffusionXLPipeline or FluxPipeline"
        )
    return found[0]

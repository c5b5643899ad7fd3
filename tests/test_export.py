"""ONNX export: every graph passes the checker and computes what the torch module computes.

The graphs come from the real build (export, polygraphy cleanup, validation), traced at
two rows and the model's default size. Here each one is compared with its torch wrapper on
fresh inputs at shapes other than the export shape: more rows and non-square images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_export_support import tiny_engines

from kiln_server.engines.components import (
    COMPONENT_NAMES,
    ShapeRequest,
    sdxl_component_specs,
)
from kiln_server.engines.sample_inputs import sample_inputs

RTOL = 1e-3


@pytest.fixture(scope="session")
def engines_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Path:
    return tiny_engines(tmp_path_factory, tiny_model_path)


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> Any:
    """(files, {component: torch wrapper module}) of the tiny model."""
    from kiln_server.engines.torch_modules import component_module
    from kiln_server.models.loader import load_modules, read_model_files

    files = read_model_files(tiny_model_path)
    modules = load_modules(tiny_model_path)
    specs = sdxl_component_specs(files.dims)
    return files, {name: component_module(spec, modules) for name, spec in specs.items()}


def session_for(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def max_relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """max |actual - expected| / max |expected|."""
    scale = float(np.abs(expected).max())
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale


@pytest.mark.parametrize("component", COMPONENT_NAMES)
def test_graph_passes_the_onnx_checker(engines_dir: Path, component: str) -> None:
    import onnx

    path = engines_dir / f"{component}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False)
    assert graph.opset_import[0].version >= 17


@pytest.mark.parametrize("component", COMPONENT_NAMES)
def test_graph_interface_is_the_declaration(engines_dir: Path, model: Any, component: str) -> None:
    """Names, element types and symbolic dims come from the one declaration."""
    import onnx

    files, _ = model
    spec = sdxl_component_specs(files.dims)[component]
    graph = onnx.load(str(engines_dir / f"{component}.onnx"), load_external_data=False).graph

    def dims(value: Any) -> tuple[int | str, ...]:
        return tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)

    def dtype(value: Any) -> str:
        return str(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))

    assert [(v.name, dtype(v), dims(v)) for v in graph.input] == [
        (t.name, t.dtype, t.dims) for t in spec.inputs
    ]
    assert [(v.name, dtype(v), dims(v)) for v in graph.output] == [
        (t.name, t.dtype, t.dims) for t in spec.outputs
    ]


# Shapes unlike the export shape (2 rows, 64x64): other batch sizes, non-square images.
SHAPES = [ShapeRequest(3, 64, 96), ShapeRequest(4, 96, 64), ShapeRequest(1, 128, 64)]


@pytest.mark.parametrize("request_shape", SHAPES, ids=lambda r: f"b{r.batch}-{r.width}x{r.height}")
@pytest.mark.parametrize("component", COMPONENT_NAMES)
def test_graph_matches_torch_at_other_shapes(
    engines_dir: Path, model: Any, component: str, request_shape: ShapeRequest
) -> None:
    files, modules = model
    spec = sdxl_component_specs(files.dims)[component]
    inputs = sample_inputs(spec, request_shape, seed=987)
    with torch.inference_mode():
        result = modules[component](*(inputs[t.name] for t in spec.inputs))
    expected = result if isinstance(result, tuple) else (result,)
    actual = session_for(engines_dir / f"{component}.onnx").run(
        [t.name for t in spec.outputs], {k: v.numpy() for k, v in inputs.items()}
    )
    for tensor, want, got in zip(spec.outputs, expected, actual, strict=True):
        assert got.shape == spec.shape(tensor.name, request_shape)
        assert max_relative_error(want.numpy().astype(np.float64), got) <= RTOL, tensor.name


def test_unet_rows_carry_their_own_timestep(engines_dir: Path, model: Any) -> None:
    """One call with rows at different steps equals separate calls at each step."""
    files, _ = model
    spec = sdxl_component_specs(files.dims)["unet"]
    inputs = {k: v.numpy() for k, v in sample_inputs(spec, ShapeRequest(2, 64, 64), 5).items()}
    inputs["timestep"] = np.array([999.0, 21.0], dtype=np.float32)
    session = session_for(engines_dir / "unet.onnx")
    (together,) = session.run(["noise_pred"], inputs)
    for row in range(2):
        single = {name: value[row : row + 1] for name, value in inputs.items()}
        (alone,) = session.run(["noise_pred"], single)
        assert max_relative_error(alone.astype(np.float64), together[row : row + 1]) <= RTOL
    assert not np.allclose(together[0], together[1])


def test_manifest_records_validation_beyond_the_export_shape(engines_dir: Path) -> None:
    from kiln_server.engines.manifest import read_manifest

    manifest = read_manifest(engines_dir)
    assert set(manifest.onnx) == set(COMPONENT_NAMES)
    for name, entry in manifest.onnx.items():
        shapes = {(v["batch"], v["height"], v["width"]) for v in entry.validated}
        assert any(batch > 2 for batch, _, _ in shapes), name
        if name.startswith(("unet", "vae", "preview_decoder")):
            assert any(h != w for _, h, w in shapes), name
        assert all(v["max_rel_error"] <= RTOL for v in entry.validated), name


def test_validation_rejects_a_graph_that_differs_from_torch(
    engines_dir: Path, model: Any, tiny_model_path: Path
) -> None:
    """A graph checked against other weights fails with the component, shape and error."""
    from kiln_build.validate import ValidationError, validate_graph
    from kiln_server.engines.torch_modules import component_module
    from kiln_server.models.loader import load_modules

    files, _ = model
    spec = sdxl_component_specs(files.dims)["vae_decoder"]
    other = component_module(spec, load_modules(tiny_model_path))
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(1.01)
    with pytest.raises(ValidationError, match=r"vae_decoder batch 1 at 64x64: rel .* 0.001"):
        validate_graph(spec, other, engines_dir / "vae_decoder.onnx", [ShapeRequest(1, 64, 64)])


def test_large_graphs_keep_weights_in_external_data(
    engines_dir: Path, tmp_path: Path, tiny_model_path: Path
) -> None:
    """Above the size threshold (real SDXL UNets are ~10 GB), weights go beside the graph."""
    import onnxruntime as ort

    from kiln_build.graph_cleanup import cleanup_graph
    from kiln_server.engines.components import vae_decoder_spec
    from kiln_server.models.loader import read_model_files

    report = cleanup_graph(
        vae_decoder_spec(read_model_files(tiny_model_path).dims),
        engines_dir / "vae_decoder.onnx",
        tmp_path / "vae_decoder.onnx",
        external_data_threshold=1024,
    )
    assert report.external_data == tmp_path / "vae_decoder.onnx.data"
    assert report.external_data.stat().st_size > (tmp_path / "vae_decoder.onnx").stat().st_size
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["latent"]


def test_build_engines_names_unknown_models_and_bad_flags(
    tmp_path: Path, kiln_cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from kiln_client.cli import main

    monkeypatch.setenv("KILN_CACHE_DIR", str(kiln_cache_dir))
    assert main(["build-engines", "--model", "sdxl-turbo", "--out", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: unknown model 'sdxl-turbo': known models are ")
    assert "--model-path DIR" in error
    with pytest.raises(SystemExit):
        main(["build-engines", "--batch-sizes", "two"])
    assert "not a comma-separated list of integers" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_model_names_resolve_through_the_server_config(
    tmp_path: Path, kiln_cache_dir: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--config` + `--model NAME` builds what `kiln serve --config` serves as NAME."""
    from kiln_build.cli import resolve_model

    monkeypatch.setenv("KILN_CACHE_DIR", str(kiln_cache_dir))
    config = tmp_path / "kiln.toml"
    config.write_text('[[models]]\nname = "tiny"\nbuiltin = "kiln-tiny-sdxl"\ndefault_width = 96\n')
    model = resolve_model("tiny", None, config)
    assert (model.name, model.path, model.default_size) == ("tiny", tiny_model_path, (64, 96))
    assert resolve_model(None, None, config).name == "tiny"  # the config's default model
    assert resolve_model(None, tiny_model_path, None).name == tiny_model_path.name


def test_build_engines_help_says_what_narrower_profiles_give_up(capsys: Any) -> None:
    from kiln_client.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["build-engines", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "refuses every request beyond these with INVALID_ARGUMENT" in text
    assert "The defaults cover every request the model's defaults allow" in text
    assert "--max-size up to the model's max_size admits larger images" in text
    assert "--vae-batch N" in text and "decodes larger requests in chunks of N" in text
    assert "--refittable" in text and "for LoRA or other weight refits" in text
    assert "refittable engines can be slower" in text and "(default: off)" in text
    assert "--skip-numerics-check" in text and "onnxruntime" in text


def test_build_engines_passes_model_limits_and_flags_to_the_build(
    tmp_path: Path, kiln_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kiln_build.build
    from kiln_build.build import BuildOptions, BuildSummary
    from kiln_build.profiles import ProfileFlags
    from kiln_client.cli import main

    seen: list[BuildOptions] = []

    def fake_run_build(options: BuildOptions) -> BuildSummary:
        seen.append(options)
        return BuildSummary(manifest_path=options.out_dir / "manifest.json")

    monkeypatch.setattr(kiln_build.build, "run_build", fake_run_build)
    monkeypatch.setenv("KILN_CACHE_DIR", str(kiln_cache_dir))
    config = tmp_path / "kiln.toml"
    config.write_text(
        '[[models]]\nname = "tiny"\nbuiltin = "kiln-tiny-sdxl"\nmax_num_outputs = 3\n'
        "min_size = 48\nmax_size = 400\n"
    )
    out = str(tmp_path / "engines")
    common = ["build-engines", "--config", str(config), "--out", out, "--quiet"]
    assert main(common) == 0
    limits = seen[-1].limits
    assert limits is not None
    assert (limits.min_size, limits.max_size, limits.max_num_outputs) == (48, 400, 3)
    assert (seen[-1].refittable, seen[-1].numerics_check) == (False, True)
    assert seen[-1].flags == ProfileFlags()
    flags = ["--vae-batch", "2", "--refittable", "--skip-numerics-check", "--max-size", "256"]
    assert main([*common, *flags]) == 0
    assert (seen[-1].refittable, seen[-1].numerics_check) == (True, False)
    assert seen[-1].flags == ProfileFlags(max_size=256, vae_batch=2)


def test_unet_graph_needs_its_declared_size_multiple(engines_dir: Path, model: Any) -> None:
    """The tiny UNet has 2 down blocks (one downsampling): sides must be multiples of 16.

    At 72x88 (multiples of 8 only) the latent is 9x11; the graph upsamples 5x6 back to
    10x12 and its skip concatenation fails, while eager torch resizes to fit. Every
    multiple of 16 runs and matches torch.
    """
    files, modules = model
    assert files.dims.graph_size_multiple == 16
    spec = sdxl_component_specs(files.dims)["unet"]
    session = session_for(engines_dir / "unet.onnx")
    for height, width in [(80, 96), (48, 112), (32, 32)]:
        inputs = sample_inputs(spec, ShapeRequest(2, height, width), seed=3)
        with torch.inference_mode():
            expected = modules["unet"](*(inputs[t.name] for t in spec.inputs)).numpy()
        (actual,) = session.run(["noise_pred"], {k: v.numpy() for k, v in inputs.items()})
        assert max_relative_error(expected.astype(np.float64), actual) <= RTOL
    odd = {k: v.numpy() for k, v in sample_inputs(spec, ShapeRequest(2, 72, 88), 3).items()}
    with pytest.raises(Exception, match="Concat"):
        session.run(["noise_pred"], odd)


def test_lora_inputs_are_off_unless_asked_and_take_the_server_defaults(
    tmp_path: Path, kiln_cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Without a LoRA flag the UNet graph keeps today's interface (and the manifest no
    `lora`); any LoRA flag turns them on, the others taking the server's defaults."""
    import kiln_build.build
    from kiln_build.build import BuildOptions, BuildSummary
    from kiln_client.cli import main
    from kiln_server.engines.manifest import LoraRecord
    from kiln_server.settings import ServerSettings

    seen: list[BuildOptions] = []

    def fake_run_build(options: BuildOptions) -> BuildSummary:
        seen.append(options)
        return BuildSummary(manifest_path=options.out_dir / "manifest.json")

    monkeypatch.setattr(kiln_build.build, "run_build", fake_run_build)
    monkeypatch.setenv("KILN_CACHE_DIR", str(kiln_cache_dir))
    common = ["build-engines", "--model", "kiln-tiny-sdxl", "--out", str(tmp_path), "--quiet"]
    assert main(common) == 0
    assert seen[-1].lora is None
    assert main([*common, "--max-lora-rank", "16"]) == 0
    defaults = ServerSettings()
    assert seen[-1].lora == LoraRecord(defaults.lora_slots, 16, defaults.max_loras_per_request)
    with pytest.raises(SystemExit):
        main(["build-engines", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lora-slots N" in text and "Off by default" in text
    assert "onnxruntime and TensorRT serve any LoRA without a rebuild or a refit" in text


def test_a_build_without_lora_flags_records_no_lora_inputs(engines_dir: Path) -> None:
    from kiln_server.engines.manifest import read_manifest

    manifest = read_manifest(engines_dir)
    assert manifest.lora is None
    names = [t.name for t in manifest.onnx["unet"].inputs]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]

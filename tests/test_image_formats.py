"""The one table of image formats, as the server, the gateway and the client read it."""

from __future__ import annotations

import pytest

from kiln_client.image_formats import (
    IMAGE_FORMATS,
    format_for_extension,
    format_for_mime_type,
    format_named,
)
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.results import extension_for_mime_type
from kiln_gateway.files import extension_for
from kiln_gateway.images import IMAGE_TYPES
from kiln_server.imaging import MIME_TYPES


def test_every_output_format_of_the_contract_has_one_entry() -> None:
    names = {
        name.removeprefix("OUTPUT_FORMAT_").lower()
        for name in pb.OutputFormat.keys()  # noqa: SIM118 (an enum wrapper, not a dict)
        if name != "OUTPUT_FORMAT_UNSPECIFIED"
    }
    assert {f.name for f in IMAGE_FORMATS} == names


@pytest.mark.parametrize(
    ("mime_type", "name"),
    [
        ("image/png", "png"),
        ("IMAGE/JPEG; q=1", "jpeg"),
        ("image/jpg", "jpeg"),
        ("image/webp", "webp"),
    ],
)
def test_mime_types_resolve_with_aliases_and_parameters(mime_type: str, name: str) -> None:
    found = format_for_mime_type(mime_type)
    assert found is not None and found.name == name


def test_unknown_names_resolve_to_none() -> None:
    assert format_for_mime_type("image/gif") is None
    assert format_for_extension(".gif") is None and format_for_extension("") is None
    assert format_named("gif") is None


def test_extensions_and_names() -> None:
    assert format_for_extension("JPEG") == format_for_extension(".jpg") == format_named("jpeg")
    assert [f.extension for f in IMAGE_FORMATS] == [".png", ".jpg", ".webp"]


def test_server_gateway_and_client_read_the_same_table() -> None:
    for image_format in IMAGE_FORMATS:
        assert MIME_TYPES[image_format.name] == image_format.mime_type
        assert extension_for_mime_type(image_format.mime_type) == image_format.extension
        assert extension_for(image_format.mime_type) == image_format.extension.lstrip(".")
    assert tuple(f.mime_type for f in IMAGE_FORMATS) == IMAGE_TYPES
    assert extension_for("image/gif") == "bin" and extension_for_mime_type("x/y") == ".bin"

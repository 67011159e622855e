"""The multipart reader admission uses: the fields it is asked for and the files' sizes, and a 400 for a
body that is not a whole multipart/form-data body."""

from __future__ import annotations

import pytest

from app.errors import GatewayError
from app.proxy.form import read_form

TYPE = "multipart/form-data; boundary=XyZ"


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--XyZ--\r\n"


def test_fields_asked_for_and_the_files_sizes() -> None:
    body = form(
        part("image[]", b"\x89PNG" + bytes(5000), "a.png"),
        part("prompt", "bleu, s'il vous plaît".encode()),
        part("image[]", bytes(300), "b.png"),
        part("model", b"gpt-image-1"),
        part("background", b"transparent"),
        part("mask", b"", "mask.png"),
    )
    read = read_form(body, TYPE, {"model", "prompt"})
    assert read.fields == {"model": "gpt-image-1", "prompt": "bleu, s'il vous plaît"}
    assert (read.files, read.file_bytes) == (3, 5304)


def test_a_file_part_is_never_taken_for_a_field() -> None:
    read = read_form(form(part("model", b"not a model", "model.txt")), TYPE, {"model"})
    assert read.fields == {} and read.files == 1


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (TYPE, b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1'),
        (TYPE, b"model=whisper-1"),
        (TYPE, b""),
        (TYPE, form(b"--XyZ\r\nContent-Type: text/plain\r\n\r\nno name\r\n")),
        ("multipart/form-data", form(part("model", b"whisper-1"))),
        ("application/x-www-form-urlencoded", b"model=whisper-1"),
        (None, form(part("model", b"whisper-1"))),
    ],
    ids=[
        "unterminated",
        "no-boundary-in-body",
        "empty",
        "part-without-name",
        "no-boundary",
        "urlencoded",
        "none",
    ],
)
def test_what_is_not_a_whole_form_is_a_400(content_type: str | None, body: bytes) -> None:
    with pytest.raises(GatewayError) as refused:
        read_form(body, content_type, {"model"})
    assert refused.value.status == 400

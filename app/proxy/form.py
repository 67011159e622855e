"""What admission needs from a multipart/form-data upload already read whole: a few of its text fields, and
how many files it carries and how many bytes they hold. The body itself is not changed or copied (it goes
upstream as it came); file contents are counted, never kept.

Parsed with python-multipart (Starlette's form parser), fed the whole body at once. A body it cannot
parse, or that ends before its closing boundary, is the client's error: 400, before it goes upstream.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from app.errors import GatewayError, bad_request

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks


@dataclass(slots=True)
class Form:
    fields: dict[str, str] = field(default_factory=dict)  # the text fields asked for, by name
    files: int = 0
    file_bytes: int = 0


@dataclass(slots=True)
class _Reader:
    keep: Collection[str]
    form: Form = field(default_factory=Form)
    header_name: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    disposition: bytes = b""
    value: bytearray | None = None  # a kept field's bytes as they come
    is_file: bool = False
    name: str = ""
    ended: bool = False

    def on_part_begin(self) -> None:
        self.disposition, self.value, self.is_file = b"", None, False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        kind, options = parse_options_header(self.disposition)
        if kind != b"form-data" or b"name" not in options:
            raise _malformed("Every part of a multipart/form-data body needs a Content-Disposition name.")
        self.is_file = b"filename" in options
        self.name = options[b"name"].decode("utf-8", "replace")
        if self.is_file:
            self.form.files += 1
        elif self.name in self.keep:
            self.value = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.is_file:
            self.form.file_bytes += end - start
        elif self.value is not None:
            self.value += data[start:end]

    def on_part_end(self) -> None:
        if self.value is not None:
            self.form.fields[self.name] = self.value.decode("utf-8", "replace")
            self.value = None

    def on_end(self) -> None:
        self.ended = True


def _malformed(detail: str) -> GatewayError:
    return bad_request(f"We could not parse the multipart/form-data body of your request. {detail}")


def read_form(raw: bytes, content_type: str | None, keep: Collection[str]) -> Form:
    """The upload's files and the text fields named in `keep`; 400 for a body that is not a complete
    multipart/form-data body."""
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise bad_request(
            f"Invalid Content-Type header ({content_type}), expected multipart/form-data.",
            param="Content-Type",
        )
    reader = _Reader(keep)
    callbacks: MultipartCallbacks = {
        "on_part_begin": reader.on_part_begin,
        "on_header_field": reader.on_header_field,
        "on_header_value": reader.on_header_value,
        "on_header_end": reader.on_header_end,
        "on_headers_finished": reader.on_headers_finished,
        "on_part_data": reader.on_part_data,
        "on_part_end": reader.on_part_end,
        "on_end": reader.on_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(raw)
        parser.finalize()
    except MultipartParseError as exc:
        raise _malformed(str(exc)) from None
    if not reader.ended:
        raise _malformed("The body ends before its closing boundary.")
    return reader.form

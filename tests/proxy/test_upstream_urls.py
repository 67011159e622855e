"""The upstream client parses each URL it calls once: the parsed URL is pyreqwest's own, and the cache of
them stays bounded whatever paths the passthrough is sent."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pyreqwest.client import ClientBuilder

from app.config import Settings
from app.proxy import upstream
from app.proxy.upstream import UpstreamClient


def test_a_url_is_parsed_once_and_as_pyreqwest_parses_it(make_settings: Callable[..., Settings]) -> None:
    client = UpstreamClient(make_settings())
    url = "http://127.0.0.1:8101/v1/files/file-%C3%A9x/content?limit=2"
    parsed = client._parsed(url)
    assert client._parsed(url) is parsed
    assert str(parsed) == str(ClientBuilder().build().request("GET", url).build().url)


def test_the_parsed_urls_kept_are_bounded(make_settings: Callable[..., Settings]) -> None:
    client = UpstreamClient(make_settings())
    for n in range(upstream._MAX_URLS * 3 + 7):
        client._parsed(f"http://127.0.0.1:8101/v1/files/file-{n}")
        assert len(client._urls) <= upstream._MAX_URLS
    latest = "http://127.0.0.1:8101/v1/chat/completions"
    assert client._parsed(latest) is client._parsed(latest)
    # A long one (a client's query, say) is parsed for its call and not kept.
    long_url = "http://127.0.0.1:8101/v1/files?after=" + "x" * upstream._MAX_URL_CHARS
    assert str(client._parsed(long_url)) == long_url
    assert long_url not in client._urls


@pytest.mark.parametrize("url", ["http://exa mple.com/v1", "not a url", "http://127.0.0.1:99999/v1"])
def test_a_bad_url_is_refused_as_before(make_settings: Callable[..., Settings], url: str) -> None:
    client = UpstreamClient(make_settings())
    with pytest.raises(ValueError) as parsed_once:
        client._parsed(url)
    with pytest.raises(ValueError) as per_call:
        ClientBuilder().build().request("POST", url)
    assert str(parsed_once.value) == str(per_call.value)
    assert client._urls == {}

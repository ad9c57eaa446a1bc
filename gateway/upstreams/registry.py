"""Builds providers from policy. A new provider kind is one entry in ``PROVIDER_KINDS``."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Mapping
from typing import Literal

import httpx
import structlog

from gateway.config.schema import ModelConfig
from gateway.upstreams.anthropic import AnthropicProvider
from gateway.upstreams.base import Provider, split_base_url
from gateway.upstreams.http11 import Http11Transport
from gateway.upstreams.openai import OpenAIProvider

__all__ = ["PROVIDER_KINDS", "api_key", "build_provider", "make_transport"]

PROVIDER_KINDS: dict[str, type[Provider]] = {
    OpenAIProvider.kind: OpenAIProvider,
    AnthropicProvider.kind: AnthropicProvider,
}

_log = structlog.get_logger("gateway.upstreams")

Transport = Literal["http11", "aiohttp", "httpx"] | httpx.AsyncBaseTransport
"""A transport by name, or one to use as it is (unit tests pass an ``httpx.MockTransport``)."""


def make_transport(config: ModelConfig, transport: Transport = "http11") -> httpx.AsyncBaseTransport:
    """The connection pool of one upstream.

    ``http11`` is the gateway's own client (:mod:`gateway.upstreams.http11`); ``aiohttp``
    puts aiohttp's connection pool under the httpx API, ``httpx`` is httpx's own; ``make
    bench --compare-transports`` measures them side by side. An upstream the environment
    sends through a proxy (``HTTPS_PROXY``, ``NO_PROXY``, ...) goes through httpx, which speaks to proxies.
    """
    if isinstance(transport, httpx.AsyncBaseTransport):
        return transport
    limits = httpx.Limits(max_connections=config.max_connections, keepalive_expiry=60.0)
    proxy = _proxy_for(config.base_url)
    if proxy is not None:
        # the transport itself goes through the proxy: the provider sends through it, not through
        # the client's proxy mounts (f73: with HTTPS_PROXY set, requests went straight out)
        shown = str(split_base_url(config.base_url)[0])  # without its query, which may hold a token
        _log.info("upstream_via_proxy", url=shown, transport="httpx")
        return httpx.AsyncHTTPTransport(limits=limits, proxy=proxy)
    if transport == "httpx":
        return httpx.AsyncHTTPTransport(limits=limits)  # what httpx.AsyncClient(limits=limits) makes itself
    if transport == "http11":
        return Http11Transport(max_connections=config.max_connections, keepalive_expiry=60.0)
    from httpx_aiohttp import AiohttpTransport

    return AiohttpTransport(limits=limits)


def build_provider(
    name: str, config: ModelConfig, environ: Mapping[str, str] | None = None, transport: Transport = "http11"
) -> Provider:
    """One pooled keep-alive client per upstream, created once, never per request."""
    pool = make_transport(config, transport)
    # the client's base has no query: httpx would put its trailing slash after it (the provider keeps it)
    client = httpx.AsyncClient(base_url=split_base_url(config.base_url)[0], transport=pool, timeout=None)
    return PROVIDER_KINDS[config.provider](name, config, client, api_key(config, environ), pool)


def api_key(config: ModelConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The model's API key from the environment, without the whitespace around it: a Secret
    made from a file written with ``echo`` ends in a newline, which no header may hold (every
    request was refused before it left, and went to the fallback: t29)."""
    environ = os.environ if environ is None else environ
    value = environ.get(config.api_key_env) if config.api_key_env else None
    return value.strip() if value is not None else None


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (the variables httpx and curl read), if any."""
    parsed = httpx.URL(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parsed.host):
        return None
    return proxy

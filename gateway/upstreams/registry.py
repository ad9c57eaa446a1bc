"""Builds providers from policy. A new provider kind is one entry in ``PROVIDER_KINDS``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import httpx

from gateway.config.schema import ModelConfig
from gateway.upstreams.anthropic import AnthropicProvider
from gateway.upstreams.base import Provider
from gateway.upstreams.openai import OpenAIProvider

__all__ = ["PROVIDER_KINDS", "build_provider", "make_client"]

PROVIDER_KINDS: dict[str, type[Provider]] = {
    OpenAIProvider.kind: OpenAIProvider,
    AnthropicProvider.kind: AnthropicProvider,
}

Transport = Literal["aiohttp", "httpx"] | httpx.AsyncBaseTransport
"""A transport by name, or one to use as it is (unit tests pass an ``httpx.MockTransport``)."""


def make_client(config: ModelConfig, transport: Transport = "aiohttp") -> httpx.AsyncClient:
    """One pooled keep-alive client per upstream, created once, never per request.

    ``aiohttp`` puts aiohttp's connection pool under the httpx API; ``make bench``
    compares it with httpx's own transport (see README for the figures).
    """
    limits = httpx.Limits(max_connections=config.max_connections, keepalive_expiry=60.0)
    base_url = config.base_url.rstrip("/") + "/"
    if isinstance(transport, httpx.AsyncBaseTransport):
        return httpx.AsyncClient(base_url=base_url, transport=transport, timeout=None)
    if transport == "httpx":
        return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=None)
    from httpx_aiohttp import AiohttpTransport

    return httpx.AsyncClient(base_url=base_url, transport=AiohttpTransport(limits=limits), timeout=None)


def build_provider(
    name: str, config: ModelConfig, environ: Mapping[str, str] | None = None, transport: Transport = "aiohttp"
) -> Provider:
    environ = os.environ if environ is None else environ
    api_key = environ.get(config.api_key_env) if config.api_key_env else None
    return PROVIDER_KINDS[config.provider](name, config, make_client(config, transport), api_key)

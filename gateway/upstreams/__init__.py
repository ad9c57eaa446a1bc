"""Upstream model servers: one :class:`Provider` per model, speaking the OpenAI chat API to the gateway.

To add a provider kind, subclass :class:`Provider` in its own module and register it in
``PROVIDER_KINDS`` (see :mod:`gateway.upstreams.registry`).
"""

from gateway.upstreams.base import ChatStream, Completion, Provider, StreamTally, Usage

__all__ = ["ChatStream", "Completion", "Provider", "StreamTally", "Usage"]

"""The HTTP surface (Litestar): OpenAI's and Anthropic's routes, usage, feedback, health,
readiness and metrics."""

from gateway.api.app import create_app

__all__ = ["create_app"]

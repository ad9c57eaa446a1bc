"""A simulated OpenAI/Anthropic-compatible upstream for ``make run``, tests and benchmarks."""

from gateway.simulated.process import SimulatedUpstream, start_simulated_upstream
from gateway.simulated.server import build_app

__all__ = ["SimulatedUpstream", "build_app", "start_simulated_upstream"]

"""A vLLM simulator that follows the sleep contract, for tests, benchmarks and the demo."""

from .engine import SimSettings, SimulatedEngine, expected_text

__all__ = ["SimSettings", "SimulatedEngine", "expected_text"]

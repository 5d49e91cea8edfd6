"""Models the gateway serves without an operator's artifact: ``digits`` (the
quickstart's demo) and ``bench`` (the benchmarks'). ``serving.demo:DigitsMLP`` and
``serving.demo:BenchMLP`` are their ``model_class`` names.
"""

from serving.demo.models import (
    BENCH_IN,
    BENCH_OUT,
    DEMO_NAME,
    DEMO_VERSION,
    BenchMLP,
    DigitsMLP,
    bench_model_config,
    demo_accuracy,
    ensure_demo_model,
    load_digits_split,
)

__all__ = [
    "BENCH_IN",
    "BENCH_OUT",
    "DEMO_NAME",
    "DEMO_VERSION",
    "BenchMLP",
    "DigitsMLP",
    "bench_model_config",
    "demo_accuracy",
    "ensure_demo_model",
    "load_digits_split",
]

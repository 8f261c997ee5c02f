"""Benchmark scripts run from a checkout; shared code lives in hybrid_megatron.devtools."""

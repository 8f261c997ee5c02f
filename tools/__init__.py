"""Command-line tools run from a checkout (see each script); shared code lives in hybrid_megatron.devtools."""

"""Pretraining of hybrid Mamba-2 / attention / MLP language models on megatron-core."""

__version__ = "0.1.0"

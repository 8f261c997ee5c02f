"""Evaluation: runs compared side by side and scaling fits (``compare``)."""

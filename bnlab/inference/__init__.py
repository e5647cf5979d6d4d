"""Inference transforms: BN once training is over.

- ``fusion``: folding BN into the conv or linear layer next to it (07);
- ``freeze``: frozen BN for fine-tuning (06);
- ``recalibrate``: precise-BN running statistics from data (06).
"""

"""medlego: one frozen ViT resident on the device, per-request SVD-LoRA adapters, Med-LEGO merging.

The layers are this package's subpackages: ``medlego.serving`` → ``medlego.runtime`` →
``medlego.kernels``, ``medlego.jobs`` → ``medlego.runtime``; ``medlego.cli`` and
``medlego.benchmarks`` sit on top (docs/architecture.md, "Layout and imports").
"""

__version__ = "0.1.0"

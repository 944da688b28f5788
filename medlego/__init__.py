"""medlego: one frozen ViT resident on the device, per-request SVD-LoRA adapters, Med-LEGO merging.

The repository's top-level folders are this package's subpackages, through symlinks in medlego/:
``medlego.runtime`` (runtime/), ``medlego.kernels`` (kernels/), ``medlego.serving`` (serving/),
``medlego.jobs`` (jobs/), ``medlego.benchmarks`` (benchmarks/).
"""

__version__ = "0.1.0"

"""bdvae: variational auto-encoders regularized by the Bhattacharyya distance to N(0, I)."""

__version__ = "0.1.0"

from bdvae.api import Run, load_run, train  # noqa: E402

__all__ = ["Run", "load_run", "train", "__version__"]

"""bdvae's version: stamped into every run directory, read by `bdvae --version` and the package metadata."""

__version__ = "0.1.0"

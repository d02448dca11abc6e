"""bdvae: variational auto-encoders regularized by the Bhattacharyya distance to N(0, I).

`import bdvae` is cheap: the Python API (`bdvae.train`, `bdvae.resume`, `bdvae.load_run`,
`bdvae.Run` from api.py; `bdvae.Callback` and `bdvae.EpochView` from tracking.py) and torch with
it are imported when first used, so that `bdvae --help` starts at once.
"""

from bdvae._version import __version__

__all__ = ["Callback", "EpochView", "Run", "load_run", "resume", "train", "__version__"]


def __getattr__(name: str):  # PEP 562: the API on first use
    if name in ("Run", "load_run", "resume", "train"):
        from bdvae import api

        return getattr(api, name)
    if name in ("Callback", "EpochView"):
        from bdvae import tracking

        return getattr(tracking, name)
    raise AttributeError(f"module 'bdvae' has no attribute {name!r}")

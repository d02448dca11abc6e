"""bdvae: variational auto-encoders regularized by the Bhattacharyya distance to N(0, I).

`import bdvae` is cheap: the Python API (`bdvae.train`, `resume`, `evaluate`, `compare`, `report`,
`load_run` and `Run` from api.py; `bdvae.Callback` and `bdvae.EpochView` from tracking.py) and
torch with it are imported when first used, so that `bdvae --help` starts at once.
"""

from bdvae._version import __version__

API = ("Run", "compare", "evaluate", "load_run", "report", "resume", "train")  # in api.py
TRACKING = ("Callback", "EpochView")  # in tracking.py
__all__ = [*API, *TRACKING, "__version__"]


def __getattr__(name: str):  # PEP 562: the API on first use
    if name in API:
        from bdvae import api

        return getattr(api, name)
    if name in TRACKING:
        from bdvae import tracking

        return getattr(tracking, name)
    raise AttributeError(f"module 'bdvae' has no attribute {name!r}")


def __dir__() -> list[str]:  # PEP 562: tab completion sees the API before its first use
    return sorted({*globals(), *__all__})

"""hdm-lightning: Hierarchical Dynamic Masks saliency maps, optimised with PyTorch Lightning.

``from hdm_lightning import explain, HDM`` gives the Python API (:mod:`hdm_lightning.api`),
imported on first use so that ``import hdm_lightning.masks`` stays light.
"""

__version__ = "0.1.0"
__all__ = ["HDM", "explain"]


def __getattr__(name: str):
    if name in __all__:
        from hdm_lightning import api

        return getattr(api, name)
    raise AttributeError(f"module 'hdm_lightning' has no attribute {name!r}")

"""hdm-lightning: Hierarchical Dynamic Masks saliency maps, optimised with PyTorch Lightning."""

__version__ = "0.1.0"

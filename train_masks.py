"""Explain images with Hierarchical Dynamic Masks: ``python train_masks.py --help``."""

from hdm_lightning.cli import main

if __name__ == "__main__":
    main()

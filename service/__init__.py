"""2S-ICR interactive GTVt segmentation service."""

__version__ = "0.1.0"

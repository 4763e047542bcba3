"""Shipped checkpoints (the demo ensemble in demo/)."""

"""The ImageNet example suite (see README.md)."""

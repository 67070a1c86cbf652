"""btpo: Bradley-Terry Policy Optimization for generative preference models."""

__version__ = "0.1.0"

"""distill: turn a large Mixture-of-Experts language model into a smaller Mixture-of-Students."""

__version__ = "0.1.0"

"""usmoe-lp: routing analysis and theory verification for sparse Mixture-of-Experts."""
__version__ = "0.1.0"

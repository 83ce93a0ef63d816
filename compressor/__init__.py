"""compress: shrink large two-tower recommenders into small, fast ones (RCE-KD) and ship them to serving."""

__version__ = "0.1.0"

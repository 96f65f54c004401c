"""The running code's version (an editable install's metadata keeps the one it was installed at)."""
__version__ = "0.2.0"

"""Test support shipped with the package: tiny random checkpoints of every family (``tiny``),
built with the stock transformers classes. Nothing here is used at run time."""

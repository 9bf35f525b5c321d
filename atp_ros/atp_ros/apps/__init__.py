"""Runnable demos built on the node: ``make demo`` and ``make serve-demo``."""

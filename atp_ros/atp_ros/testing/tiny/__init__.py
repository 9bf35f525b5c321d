"""Tiny random checkpoints of the supported VLM families, built in-process.

The test suite and ``make demo`` (until the project's trained model lands) build
these, save them with ``save_pretrained`` and load them back through the same
loading code users use. No network is touched. The weights are random: answers are
word salad, but every tensor takes the real code path.
"""

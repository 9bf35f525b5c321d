"""The synthetic warehouse world and its bundled model: scenes, the ``warehouse`` CLI, the
trainer of ``warehouse-tiny`` and its model card."""

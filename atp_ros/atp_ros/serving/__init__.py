"""Ray Serve: one batched VLM deployment shared by many nodes (``atp-serve``), and its client."""

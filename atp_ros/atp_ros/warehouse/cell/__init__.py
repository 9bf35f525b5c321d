"""A MuJoCo warehouse cell: per-frame ground truth, questions about it and their tokenizer."""

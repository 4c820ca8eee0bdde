"""Stage 4, evaluate: bits per byte per language of a checkpoint (PyTorch) or a GGUF (llama.cpp).

`bpb.py` reads the texts and windows and scores them, `sources.py` resolves eval.py's SOURCE,
`report.py` prints the table, writes --json and logs to MLflow; `run.py` strings them together.
"""

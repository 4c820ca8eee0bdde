"""BulbaGPT Studio: train small Llama-3-style models and ship them as GGUF."""

__version__ = "0.1.0"

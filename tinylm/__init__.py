"""tinylm: train small GPT-2-style language models with the Hugging Face stack."""

__version__ = "0.1.0"

"""The transformers path: FLAS as a forward hook on a Hugging Face model, the way the original runs it (the parity oracle)."""

"""phi3v-train: full-parameter fine-tuning of Phi-3-Vision with packed sequences and ZeRO-3."""

__version__ = "0.1.0"

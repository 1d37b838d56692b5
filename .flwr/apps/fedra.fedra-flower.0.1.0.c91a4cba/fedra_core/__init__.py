"""FedRA, framework-free: allocation, aggregation, sub-model assembly, LoRA and training."""

__version__ = "0.1.0"

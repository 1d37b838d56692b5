"""Flower ClientApp: sub-model assembly and local LoRA training on each device."""

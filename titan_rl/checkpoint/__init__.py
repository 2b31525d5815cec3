"""Checkpoint formats: HF safetensors names and layouts, DCP training state."""

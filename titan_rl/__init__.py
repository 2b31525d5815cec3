"""titan_rl: on-policy agentic RL for GPT-OSS in native PyTorch."""

__version__ = "0.1.0"

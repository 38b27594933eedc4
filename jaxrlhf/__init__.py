"""jaxrlhf: the RLHF pipeline for GPT-2 (SFT, reward model, PPO, DPO / SLiC-HF) in JAX."""

__version__ = "0.1.0"

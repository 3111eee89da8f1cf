"""anomaly_rl: GRPO training of vision-language models as industrial anomaly inspectors."""

__version__ = "0.1.0"

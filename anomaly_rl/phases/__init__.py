"""The phases of a training run and what they share: settings checked at start, the run's state,
one trainer per phase, where GRPO starts from. `anomaly_rl.train` composes them."""

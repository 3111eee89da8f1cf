"""What every training phase and evaluation share: batches, data parallelism, random state,
learning-rate schedules, prompts, the guarded optimiser update and the errors that stop a run."""

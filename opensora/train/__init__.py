"""Training machinery used by the train task (opensora/tasks/train.py) and the benchmark: the compiled step
(step.py), what is drawn for each global batch and how a batch becomes model inputs (batch.py), the training
state kept in checkpoints (state.py) and held-out evaluation (evaluate.py)."""

"""The staged step, written once: the shared `Trainer`, the `StepState` of one
step, the `Pipeline` of hooks a model keeps, and the parts they share (logs, loss
scaling, gradient accumulation, what `.keras` files hold)."""

"""Running models: the one training step and epoch loop, what a stage-2 run is built from, devices, DDP, teachers.

- `loop`: Step (autocast, loss scaling, accumulation, clipping, EMA) and run_epoch, shared by every trainer.
- `training`: parameter groups, the timm optimizer and scheduler, mixup/cutmix, freezing.
- `runtime`: device, autocast dtype and the one autocast helper, channels_last, torch.compile, loaders.
- `distributed`: torchrun helpers (Dist) and one fold per GPU.
- `cleaning`: label issues of a fold's training rows (confident learning on an inner cross-validation).
- `teacher`: leak-free pseudo-label and distillation targets from finished experiments or ensembles.

Nothing is imported here: `from pipeline.core.engine import loop` loads that module alone.
"""

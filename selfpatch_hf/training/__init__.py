"""What the training scripts share, one concern per module:

- `arguments`: the pretraining script's options, recipe files (YAML/JSON) and the checks that need only them;
- `schedules`: learning rate, weight decay, teacher momentum and temperature as functions of the optimiser step;
- `optimization`: AdamW parameter groups, per-tensor gradient clipping, last-layer freezing;
- `checkpointing`: atomic, rotating, verifiable checkpoints with per-process stream positions;
- `resume`: what a resumed run must share with its checkpoint (global batch, data-stream cut, model configuration);
- `preemption`: SIGTERM / Ctrl-C turned into a checkpoint at the next step boundary;
- `divergence`: exploding weights / gradients / losses caught before they are saved; checkpoint health;
- `metrics_log`: the `metrics.jsonl` record of a run;
- `hub_uploads`: background, retried, time-bounded Hub uploads of exported backbones;
- `host_memory`: keeping freed host memory for reuse on CPU training.

Nothing here imports the top-level `training/` scripts.
"""

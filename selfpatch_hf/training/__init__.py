"""What the training scripts share, one concern per module:

- `arguments`: the scripts' options (`common` for what every script shares, `pretraining`, `segmentation`), recipe
  files (YAML/JSON) and the checks that need only them;
- `runtime`: the accelerator and its launch checks, logging, CPU threads / host memory / precision, CUDA set-up,
  Hub request limits and the final upload wait, activation checkpointing, trackers, exit statuses;
- `output_folder`: one live run per output folder, its preparation, final artefacts written whole and recorded;
- `loop`: one pretraining optimiser step (`train_step`) and the batches it reads;
- `schedules`: learning rate, weight decay, teacher momentum and temperature as functions of the optimiser step;
- `optimization`: AdamW parameter groups, per-tensor gradient clipping, last-layer freezing;
  `finetuning_optimization`: layer-wise decay and the warm-up + poly / cosine schedule of dense fine-tuning;
- `checkpointing`: atomic, rotating, verifiable checkpoints with per-process stream positions;
- `resume`: what a resumed run must share with its checkpoint (global batch, data-stream cut, model configuration,
  crop recipe);
- `preemption`: SIGTERM / Ctrl-C turned into a checkpoint at the next step boundary, data workers kept working;
- `divergence`: exploding weights / gradients / losses caught before they are saved; checkpoint health;
- `mixed_precision`: fp16 steps the loss scaler skips leave the model as it was;
- `metrics_log`: the `metrics.jsonl` record of a run;
- `compilation`, `cuda_setup`, `host_memory`: torch.compile, CUDA defaults, freed host memory on the CPU.

The objectives' training recipes (crops, schedules, clipping) are `selfpatch_hf.models.selfpatch.recipes`. Nothing
here imports the top-level `training/` scripts.
"""

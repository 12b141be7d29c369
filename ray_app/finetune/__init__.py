"""LoRA fine-tuning: training-data builders, loss masking, the training loop (pure Python and
torch) and a thin Ray Train layer (`ray_app.finetune.ray_job`) that runs it data-parallel."""

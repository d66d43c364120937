"""Training either stage: `config` (TrainConfig, config files, the LR schedule), `loop`
(the training loop), `checkpoints` (resumable run state), `export` (runs -> a model folder)."""

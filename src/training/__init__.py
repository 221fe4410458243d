"""Training: the LightningModule (`module`: AR-initialised model, block-diffusion loss, LR
schedule), its callbacks (`callbacks`, and the decode evaluation `decode_eval`), DeepSpeed ZeRO
helpers (`zero`, `zero_export`), the run's compose-time checks (`checks`), its memory plan
(`plan`) and the step-cost benchmark (`step_bench`)."""

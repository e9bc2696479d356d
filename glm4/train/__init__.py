"""Training: pretraining (causal LM, GLM blank infilling), SFT (full, LoRA, P-tuning v2; vision checkpoints on
image-text jsonl: vision_data.py), DPO, MoE balance, many processes (torchrun: DDP / FSDP2). Entry points `glm4 pretrain|finetune|dpo` and
`torchrun --nproc-per-node N -m glm4.train <pretrain|finetune|dpo> ...`.

Python API (the CLI is the same functions over the same dataclasses):
    from glm4.train import pretrain, finetune, dpo
    pretrain.run(pretrain.PretrainArgs(...)); finetune.run(model=..., data=..., method="lora", ...)
    lora.apply_lora / merge_lora / save_adapter / load_adapter; ptuning.apply_ptuning / save_prefix / load_prefix
"""

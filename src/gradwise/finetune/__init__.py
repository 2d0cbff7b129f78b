"""Fine-tuning a pretrained body: freezing, gradual unfreezing, layer-wise LR decay, LoRA, NEFTune, transfer."""

from gradwise.finetune.freezing import GradualUnfreezer, ModelParts, apply_freezing, model_parts
from gradwise.finetune.llrd import layer_lr_multipliers
from gradwise.finetune.lora import apply_lora, count_trainable, is_lora, load_adapter, merge_lora, save_adapter
from gradwise.finetune.neftune import attach_neftune, neftune_noise_bound
from gradwise.finetune.transfer import TransferReport, load_from_run

__all__ = [
    "GradualUnfreezer",
    "ModelParts",
    "TransferReport",
    "apply_freezing",
    "apply_lora",
    "attach_neftune",
    "count_trainable",
    "is_lora",
    "layer_lr_multipliers",
    "load_adapter",
    "load_from_run",
    "merge_lora",
    "model_parts",
    "neftune_noise_bound",
    "save_adapter",
]

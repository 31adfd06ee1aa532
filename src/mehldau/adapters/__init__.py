"""Low-rank adaptation of a pretrained base: LoRA through peft, QLoRA through bitsandbytes."""

from mehldau.adapters.lora import (
    AdapterConfig,
    apply_lora,
    load_adapter,
    merge,
    read_base_pointer,
    save_adapter,
    trainable_parameters,
)

__all__ = ["AdapterConfig", "apply_lora", "load_adapter", "merge", "read_base_pointer",
           "save_adapter", "trainable_parameters"]

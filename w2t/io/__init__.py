"""Reading: an adapter file or folder in (PEFT, kohya, diffusers; LoRA, LoHa, LoKr), an `Adapter` of (A, B, scale) per
module out."""

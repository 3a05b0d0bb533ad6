"""Reading: an adapter file or folder in (PEFT, kohya, diffusers), an `Adapter` of (A, B, scale) per module out."""

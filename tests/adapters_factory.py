"""Builders of REAL LoRA (and LoHa/LoKr) adapters for tests, made with the `peft` library on tiny random models.

PEFT initializes `lora_B = 0`, which makes ΔW = 0 and hides every scale or transpose bug, so all
builders pass `init_lora_weights=False` (random A and B; `init_weights=False` for LoHa/LoKr). The live
`PeftModel` is returned next to the saved folder: its `scaling` and `get_delta_weight` are the ground
truth a reader must reproduce.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lokr.layer import factorization
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(num_layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    """Hidden 64, 4 heads, 2 KV heads: k/v project to 32, narrower than q (GQA)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=num_layers,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


class TinyConvNet(nn.Module):
    """3x3 and 1x1 convolutions, so conv LoRA covers both kernel shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.proj = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return self.head(x.mean(dim=(2, 3)))


@dataclass
class BuiltAdapter:
    """A saved adapter folder and the live PEFT model it was saved from."""

    path: Path
    model: PeftModel

    def lora_layers(self) -> dict[str, LoraLayer | LycorisLayer]:
        """LoRA- (or LoHa/LoKr-) wrapped modules by the name their keys carry in the file."""
        return {
            name: m
            for name, m in self.model.named_modules()
            if isinstance(m, LoraLayer) and "default" in m.lora_A
            or isinstance(m, LycorisLayer) and "default" in m.scaling
        }

    def expected(self) -> dict[str, tuple[float, torch.Tensor]]:
        """Per module: PEFT's own scaling and ΔW as a matrix (conv kernels flattened)."""
        out = {}
        with torch.no_grad():
            for name, layer in self.lora_layers().items():
                delta = layer.get_delta_weight("default")
                out[name] = (layer.scaling["default"], delta.reshape(delta.shape[0], -1))
        return out


def build_peft_adapter(
    model: nn.Module, out_dir: Path, *, seed: int = 0, safe: bool = True, **lora_kwargs
) -> BuiltAdapter:
    """Wrap `model` with a random-init LoRA (`LoraConfig(**lora_kwargs)`) and `save_pretrained` it.

    `safe=False` saves the pickle `adapter_model.bin` instead of safetensors.
    """
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    peft_model.save_pretrained(out_dir, safe_serialization=safe)
    return BuiltAdapter(Path(out_dir), peft_model)


def llama_adapter(out_dir: Path, *, num_layers: int = 3, seed: int = 0, **lora_kwargs) -> BuiltAdapter:
    lora_kwargs = {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS, **lora_kwargs}
    return build_peft_adapter(tiny_llama(num_layers, seed), out_dir, seed=seed, **lora_kwargs)


def bert_adapter(out_dir: Path, *, seed: int = 0, **lora_kwargs) -> BuiltAdapter:
    lora_kwargs = {"r": 4, "lora_alpha": 16, "target_modules": ["query", "value"], **lora_kwargs}
    return build_peft_adapter(tiny_bert(seed), out_dir, seed=seed, **lora_kwargs)


def conv_adapter(out_dir: Path, *, seed: int = 0, **lora_kwargs) -> BuiltAdapter:
    torch.manual_seed(seed)
    lora_kwargs = {"r": 2, "lora_alpha": 4, "target_modules": ["conv1", "conv2", "proj"], **lora_kwargs}
    return build_peft_adapter(TinyConvNet(), out_dir, seed=seed, **lora_kwargs)


# kohya's own key names (SD 1.x UNet and CLIP text encoder), with tiny widths: (module, m, n, kernel).
KOHYA_MODULES: tuple[tuple[str, int, int, int], ...] = (
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32, 1),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 32, 48, 1),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q", 32, 32, 1),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj", 128, 32, 1),
    ("lora_unet_down_blocks_0_resnets_0_conv1", 32, 32, 3),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 48, 48, 1),
    ("lora_te_text_model_encoder_layers_11_self_attn_q_proj", 48, 48, 1),
    ("lora_te_text_model_encoder_layers_2_mlp_fc1", 96, 48, 1),
)


def write_kohya_file(
    path: Path, *, rank: int = 4, alpha: float | None = 2.0, dtype: torch.dtype = torch.float16, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A kohya-style file; returns per module (A as a matrix, B as a matrix, scale) in float32.

    Conv entries are real 4-D kernels: down `[r, c_in, 3, 3]`, up `[c_out, r, 1, 1]`.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected = {}
    for name, m, n, k in KOHYA_MODULES:
        down = torch.randn(rank, n, k, k, generator=gen) if k > 1 else torch.randn(rank, n, generator=gen)
        up = torch.randn(m, rank, 1, 1, generator=gen) if k > 1 else torch.randn(m, rank, generator=gen)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
        scale = 1.0 if alpha is None else alpha / rank
        expected[name] = (down.to(dtype).float().reshape(rank, -1), up.to(dtype).float().reshape(m, rank), scale)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return expected


def build_lycoris_adapter(model: nn.Module, out_dir: Path, config: PeftConfig, *, seed: int = 0) -> BuiltAdapter:
    """Wrap `model` with a LoHa/LoKr `config` (pass `init_weights=False`: PEFT zeroes a factor) and save it."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    return BuiltAdapter(Path(out_dir), peft_model)


def _lokr_scale(alpha: float | None, w1b: torch.Tensor | None, w2b: torch.Tensor | None) -> float:
    """LyCORIS' LoKr scale: alpha over the rank of the decomposed factor; 1 without alpha or when both are full."""
    rank = w1b.shape[0] if w1b is not None else w2b.shape[0] if w2b is not None else None
    return 1.0 if alpha is None or rank is None else alpha / rank


def write_lycoris_file(
    path: Path, kind: str, *, rank: int = 2, alpha: float | None = 3.0, dtype: torch.dtype = torch.float16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A LyCORIS `kind` ("loha" or "lokr") file with kohya module names; returns each module's ΔW (float64,
    conv kernels flattened), computed densely by the format's own formulas from the stored tensors.

    LoHa: linear modules plain, the conv with Tucker cores (`hada_t1`, `hada_t2`). LoKr cycles through
    w1 full + w2 low-rank, both decomposed, both full (scale 1); the conv has a Tucker `lokr_t2`.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected = {}

    def put(key: str, *shape: int) -> torch.Tensor:
        tensors[key] = torch.randn(*shape, generator=gen).to(dtype)
        return tensors[key].double()

    for i, (name, m, n, k) in enumerate(KOHYA_MODULES):
        kernel = (k, k) if k > 1 else ()
        if kind == "loha":
            if kernel:
                factors = [(put(f"{name}.hada_t{j}", rank, rank, *kernel), put(f"{name}.hada_w{j}_a", rank, m),
                            put(f"{name}.hada_w{j}_b", rank, n)) for j in (1, 2)]
                halves = [torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa) for t, wa, wb in factors]
            else:
                halves = [put(f"{name}.hada_w{j}_a", m, rank) @ put(f"{name}.hada_w{j}_b", rank, n) for j in (1, 2)]
            delta = halves[0] * halves[1] * (1.0 if alpha is None else alpha / rank)
        else:
            (a, b), (c, d) = factorization(m, 4), factorization(n, 4)
            mode = "tucker" if kernel else ("w2", "both", "full")[i % 3]
            w1b = w2b = None
            if mode == "both":
                w1a, w1b = put(f"{name}.lokr_w1_a", a, rank), put(f"{name}.lokr_w1_b", rank, c)
                w1 = w1a @ w1b
            else:
                w1 = put(f"{name}.lokr_w1", a, c)
            if mode == "full":
                w2 = put(f"{name}.lokr_w2", b, d)
            elif mode == "tucker":
                t2, w2a, w2b = put(f"{name}.lokr_t2", rank, rank, *kernel), put(f"{name}.lokr_w2_a", rank, b), \
                    put(f"{name}.lokr_w2_b", rank, d)
                w2 = torch.einsum("i j k l, i p, j r -> p r k l", t2, w2a, w2b).contiguous()  # kron needs it
                w1 = w1[:, :, None, None]
            else:
                w2 = put(f"{name}.lokr_w2_a", b, rank) @ (w2b := put(f"{name}.lokr_w2_b", rank, d))
            delta = torch.kron(w1, w2) * _lokr_scale(alpha, w1b, w2b)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
        expected[name] = delta.reshape(m, -1)
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return expected

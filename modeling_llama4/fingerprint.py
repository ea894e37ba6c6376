"""One fingerprint of a model's weights, the key of every cache that must not serve one model's outputs for
another's (the eval sample cache, the recipes' sample cache, stored teacher logits).

Works for any `PreTrainedModel`. Not imported by the modeling files, so it does not travel as remote code.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

__all__ = ["prompting_fingerprint", "weights_fingerprint"]

# Where it came from and how it was loaded, not what it computes (tensor dtypes are hashed with the tensors).
_CONFIG_KEYS_IGNORED = ("_name_or_path", "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype")


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """A 16-hex-digit hash of the config and of every tensor's name, shape, dtype, first 64 values and sum.

    Reading every tensor once (a sum, not a byte-wise hash of the whole checkpoint) keeps it cheap on large
    models; any training step moves the sums. Sums are printed to 6 significant digits so that the same
    weights give the same key on CPU and GPU (reduction order differs in the last bits)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        fields = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_KEYS_IGNORED}
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().flatten()
        flat = flat.float() if not flat.is_complex() else torch.view_as_real(flat).float().flatten()
        digest.update(f"{flat[:64].cpu().tolist()}{flat.double().sum().item():.6e}".encode())
    return digest.hexdigest()[:16]


def prompting_fingerprint(tokenizer, model: nn.Module | None = None) -> str:
    """A 16-hex-digit hash of what turns the same messages into other prompts or stops generation elsewhere: the
    chat template, the special tokens and the model's generation config. `tokenizer` may be a processor."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    fields = {
        "chat_template": getattr(tokenizer, "chat_template", None) or getattr(inner, "chat_template", None),
        "special_tokens": {k: str(v) for k, v in sorted((getattr(inner, "special_tokens_map", None) or {}).items())},
        "generation_config": None,
    }
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:  # what differs from the defaults; not the transformers version
        settings = generation_config.to_diff_dict()
        fields["generation_config"] = {
            k: v for k, v in settings.items() if k != "transformers_version" and k[0] != "_"
        }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]

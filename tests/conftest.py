import pytest
import torch

TINY_TEXT = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=32,
    intermediate_size_mlp=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=1,
    attention_chunk_size=16,
    no_rope_layer_interval=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def tiny_text_kwargs(**overrides) -> dict:
    return {**TINY_TEXT, **overrides}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def hub_online(monkeypatch):
    """Tests that talk to the local Hub server must not inherit HF_HUB_OFFLINE=1 from the environment."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

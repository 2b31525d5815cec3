"""Native <-> Hugging Face parameter names.

Native names are the HF names without the ``model.`` prefix of the decoder (``lm_head`` has none),
and every tensor has the same layout, so conversion is a rename.
"""

from __future__ import annotations

import torch

HF_PREFIX = "model."
UNPREFIXED = ("lm_head.",)


def to_hf_name(native: str) -> str:
    return native if native.startswith(UNPREFIXED) else HF_PREFIX + native


def from_hf_name(hf: str) -> str:
    if hf.startswith(UNPREFIXED):
        return hf
    if not hf.startswith(HF_PREFIX):
        raise KeyError(f"unexpected tensor name {hf!r} in a GPT-OSS HF checkpoint")
    return hf[len(HF_PREFIX) :]


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_hf_name(k): v for k, v in state_dict.items()}


def from_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {from_hf_name(k): v for k, v in state_dict.items()}

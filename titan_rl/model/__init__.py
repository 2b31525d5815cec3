"""The native GPT-OSS model: ``GptOss(GptOssModelArgs.from_preset("debug"))(tokens)``."""

from titan_rl.model.args import GptOssModelArgs
from titan_rl.model.logprobs import token_logprobs_and_entropy
from titan_rl.model.model import GptOss, positions_from_document_ids

__all__ = ["GptOss", "GptOssModelArgs", "positions_from_document_ids", "token_logprobs_and_entropy"]

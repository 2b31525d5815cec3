"""The tokenizer: a Hugging Face ``tokenizer.json`` plus the Harmony special tokens by name.

``encode`` never produces a special token: text that merely spells ``<|end|>`` (a tool result, a
user message) is encoded as ordinary text, so the environment cannot inject message structure.
Special tokens are only ever placed by ``titan_rl.rl.harmony`` through ``Tokenizer.special``.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

HARMONY_SPECIAL_TOKENS = (
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
    "<|endoftext|>",
)
_SPECIAL_PATTERN = re.compile("|".join(re.escape(s) for s in HARMONY_SPECIAL_TOKENS))


class Tokenizer:
    """Text <-> token ids; ``special[name]`` is the id of a Harmony special token."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        missing = [name for name in HARMONY_SPECIAL_TOKENS if hf.token_to_id(name) is None]
        if missing:
            raise ValueError(
                f"tokenizer lacks the Harmony special tokens {missing}; GPT-OSS needs the o200k_harmony "
                "tokenizer.json from the checkpoint folder (or build_tiny_tokenizer() for tests)"
            )
        self.special: dict[str, int] = {name: hf.token_to_id(name) for name in HARMONY_SPECIAL_TOKENS}
        self.special_ids: frozenset[int] = frozenset(self.special.values())

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load ``path/tokenizer.json`` (the file GPT-OSS checkpoints ship); never downloads."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {path}: copy the checkpoint's tokenizer.json there "
                "(gpt-oss ships it next to config.json); for a model of the debug preset, write the "
                'built-in 512-token one: python -c "from titan_rl.rl.tokenizer import build_tiny_tokenizer; '
                f"build_tiny_tokenizer().save('{path}')\""
            )
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception on a malformed file
            raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from None
        return cls(hf)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/tokenizer.json``; ``from_folder(folder)`` loads it back."""
        file = Path(folder) / "tokenizer.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(file))
        return file

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids; a spelled-out special token is split so it stays text. Text that is
        not valid Unicode (lone surrogates: bytes a tool decoded with ``surrogateescape``) gets "?"
        for them instead of the tokenizer's TypeError."""
        text = text.encode("utf-8", "replace").decode("utf-8")
        ids: list[int] = []
        start = 0
        for match in _SPECIAL_PATTERN.finditer(text):
            ids += self._encode_plain(text[start : match.start()])
            ids += self._encode_plain(match.group()[:2]) + self._encode_plain(match.group()[2:])
            start = match.end()
        return ids + self._encode_plain(text[start:])

    def _encode_plain(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        """Ids to text, special tokens written out (``<|call|>``)."""
        return self.hf.decode(list(ids), skip_special_tokens=False)


# A small built-in corpus for the tiny tokenizer: Harmony headers, tool-call JSON, numbers and
# the kind of English the built-in tasks use. Byte-level BPE covers any other text byte by byte.
_TINY_CORPUS = (
    "<|start|>system<|message|>You are a helpful assistant.<|end|>",
    "<|start|>developer<|message|># Instructions\nAnswer the question.\n\n# Tools\n\n## functions\n\n"
    "namespace functions {\n\n// Look up the value stored under a key.\ntype lookup = (_: {\nkey: string,\n"
    "}) => any;\n\n// Run Python code and return what it prints.\ntype python = (_: {\ncode: string,\n"
    "}) => any;\n\n} // namespace functions<|end|>",
    "<|start|>user<|message|>What is the value of apple?<|end|><|start|>assistant",
    "<|start|>assistant to=functions.lookup<|channel|>commentary <|constrain|>json<|message|>"
    '{"key": "apple"}<|call|>',
    "<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>42<|end|>",
    "<|start|>assistant<|channel|>analysis<|message|>I need to look up the key first.<|end|>",
    "<|start|>assistant<|channel|>final<|message|>The answer is 42.<|return|>",
    "<|start|>assistant to=functions.python<|channel|>commentary <|constrain|>json<|message|>"
    '{"code": "print(3 * 4 + 5)"}<|call|>',
    "Error: the tool raised an exception. Error: unknown tool. Error: the tool timed out.",
    "Calls to these tools must go to the commentary channel: 'functions'.",
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.",
    "Tom has 3 apples and buys 5 more. How many apples does he have now? 3 + 5 = 8 #### 8",
    "A shop sells 12 pens for 4 dollars each. The total cost is 12 * 4 = 48 dollars. #### 48",
    "If each box holds 6 eggs, how many boxes are needed for 30 eggs? 30 / 6 = 5 #### 5",
    "She spent half of her 20 dollars, then earned 15 more. 20 - 10 + 15 = 25 #### 25",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 minutes hours days weeks per each total left more less",
    "red blue green yellow orange purple black white cat dog fish bird lion bear wolf fox owl",
)


TINY_VOCAB = 512  # the built-in tokenizer's size (the debug preset's vocabulary)


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB) -> Tokenizer:
    """A byte-level BPE tokenizer trained on a small built-in corpus (no download), for tests and the
    debug model: the 8 Harmony special tokens get ids 0-7, then the 256 byte symbols, then merges up
    to ``vocab_size`` in all (deterministic)."""
    base = len(HARMONY_SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise ValueError(
            f"vocab_size {vocab_size} < {base} (8 special tokens + 256 bytes); use at least {base}"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(HARMONY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(list(_TINY_CORPUS) * 4, trainer)
    return Tokenizer(hf)

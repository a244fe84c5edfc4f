"""A character-level tokenizer for the tiny mini-CoIN model.

One token per character of printable ASCII, plus five special tokens with fixed ids:
`<pad>` = 0, `<s>` = 1 (bos), `</s>` = 2 (eos), `<unk>` = 3, `<image>` = 4. The ids never
depend on anything but this file, so a saved model and a freshly built tokenizer agree.
Special tokens written in text (`"<image>"`, `"</s>"`) are recognised as one token each;
any other character outside printable ASCII becomes `<unk>`. Encoding a text adds `<s>`
in front (`add_special_tokens=False` leaves it out); decoding concatenates characters.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)
# string.printable: digits, letters, punctuation and the whitespace " \t\n\r\x0b\x0c".
CHARACTERS: tuple[str, ...] = tuple(sorted(set(string.printable)))


def char_vocab() -> dict[str, int]:
    """The token → id map: the special tokens first, then the characters in code-point order."""
    return {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer (105 tokens, deterministic ids, no files read)."""
    vocab = char_vocab()
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character is its own "word"; [\s\S] also matches newlines.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join tokens with no separator
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IMAGE_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    return tokenizer

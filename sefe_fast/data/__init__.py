"""sefe_fast.data: the CoIN loader, the LLaVA-1.5 template, images, and the mini-CoIN generator."""

from sefe_fast.data.char_tokenizer import IMAGE_TOKEN, build_char_tokenizer
from sefe_fast.data.coin import (
    CoinDataError,
    CoinTrainDataset,
    LoadStats,
    collate_train,
    load_train_dataset,
)
from sefe_fast.data.coin_test_records import TestRecord, load_test_records
from sefe_fast.data.conversation import (
    SYSTEM_PROMPT,
    TokenizedConversation,
    build_generation_prompt,
    tokenize_conversation,
    with_image_placeholder,
)
from sefe_fast.data.images import expand_to_square, image_to_pixel_values, load_image

__all__ = [
    "IMAGE_TOKEN",
    "SYSTEM_PROMPT",
    "CoinDataError",
    "CoinTrainDataset",
    "LoadStats",
    "TestRecord",
    "TokenizedConversation",
    "build_char_tokenizer",
    "build_generation_prompt",
    "collate_train",
    "expand_to_square",
    "image_to_pixel_values",
    "load_image",
    "load_test_records",
    "load_train_dataset",
    "tokenize_conversation",
    "with_image_placeholder",
]

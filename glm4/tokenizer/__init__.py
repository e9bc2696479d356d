"""GLM-4 tokenizers. No torch import in this package (and nothing else from glm4).

    from glm4.tokenizer import load_tokenizer
    tok = load_tokenizer("path/to/checkpoint"); ids = tok.encode("你好, world"); text = tok.decode(ids)

Chat formats (rendering messages, parsing replies) live in glm4.chat.
"""

from .loading import load_tokenizer
from .tokenizer import (
    CHAT_EOS_TOKENS,
    GLM4_PAT_STR,
    GLM4_SPECIAL_TOKENS,
    HFTokenizer,
    IncrementalDetokenizer,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerError,
    TokenTexts,
)

__all__ = [
    "CHAT_EOS_TOKENS",
    "GLM4_PAT_STR",
    "GLM4_SPECIAL_TOKENS",
    "HFTokenizer",
    "IncrementalDetokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "TokenizerError",
    "TokenTexts",
    "load_tokenizer",
]

"""Tokenizers behind one interface (`Tokenizer`): performance events first."""

from mehldau.tokenize.base import Tokenizer, build_tokenizer, load_tokenizer, register

__all__ = ["Tokenizer", "build_tokenizer", "load_tokenizer", "register"]

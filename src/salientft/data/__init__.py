"""Data: the embedded Arrow corpora, chat formatting and tokenization."""

"""Rendering a conversation as text with a tokenizer's chat template (or a ChatML fallback).

Shared by ``data.chat`` (tokenization with assistant-only labels) and ``data.instruct``
(held-out texts for perplexity), below both of them.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Used only when a tokenizer has no chat template (base models): ChatML with the tokenizer's eos.
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}EOS\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template_for(tokenizer) -> str | None:
    """None when the tokenizer has its own chat template, else the ChatML fallback with its eos."""
    if getattr(tokenizer, "chat_template", None):
        return None  # use the tokenizer's own
    eos = tokenizer.eos_token
    if eos is None:
        raise ValueError("the tokenizer has neither a chat template nor an eos token; "
                         "set tokenizer.chat_template before building chat data")
    logger.warning("tokenizer has no chat template; using a ChatML fallback ending turns with %r", eos)
    return _FALLBACK_TEMPLATE.replace("EOS", eos)


def render_chat(tokenizer, messages, add_generation_prompt: bool = False, chat_template=None) -> str:
    """``messages`` rendered with the tokenizer's chat template (or the ChatML fallback)."""
    if chat_template is None:
        chat_template = chat_template_for(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template)

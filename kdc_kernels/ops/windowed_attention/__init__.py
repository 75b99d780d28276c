from .api import windowed_attention
from .reference import windowed_attention_ref

__all__ = ["windowed_attention", "windowed_attention_ref"]

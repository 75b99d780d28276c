"""Drop-in ``nn.Module`` layers over the public ops."""

from .temporal_attention import DynamicTemporalAttention

__all__ = ["DynamicTemporalAttention"]

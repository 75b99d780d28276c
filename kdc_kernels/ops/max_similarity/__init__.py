from .api import max_similarity, max_similarity_topk, merge_topk
from .reference import max_similarity_ref, max_similarity_topk_ref

__all__ = ["max_similarity", "max_similarity_topk", "merge_topk", "max_similarity_ref", "max_similarity_topk_ref"]

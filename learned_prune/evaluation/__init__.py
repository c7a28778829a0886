"""Metrics, FLOPs, latency/memory, tables and plots."""

from .vqa import AnswerAccuracy, greedy_answers, normalize_answer

__all__ = ["AnswerAccuracy", "greedy_answers", "normalize_answer"]

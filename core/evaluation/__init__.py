"""Evaluation: VQA accuracy, captioning metrics, retrieval Recall@K, and the task runners."""

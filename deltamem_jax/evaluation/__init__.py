"""Evaluation utilities: answer scoring, LoCoMo loading/rendering and result reports."""

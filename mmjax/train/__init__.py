"""Trainers, one per model, plus the loop pieces they share."""

"""Held-out figures: answer accuracy, recall, image similarity."""

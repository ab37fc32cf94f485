"""Data: datasets -> tokenized splits (tokenized.py), and batches and the restartable training stream (batches.py)."""

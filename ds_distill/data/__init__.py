"""Data: the run's tokenizer (tokenizers.py), datasets -> tokenized splits (tokenized.py), and batches and the
restartable training stream (batches.py)."""

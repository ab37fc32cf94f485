"""Data: the run's tokenizer (tokenizers.py), datasets -> tokenized splits (tokenized.py), text packed into
blocks (packing.py), two tokenizations aligned (alignment.py), and batches and the restartable training stream
(batches.py)."""

IGNORE_INDEX = -100  # the Hugging Face label convention for positions that do not count

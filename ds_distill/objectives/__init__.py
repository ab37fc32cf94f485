"""Objectives: what a student is trained to match. The loss registry (registry.py) and its terms (logits.py with
divergences.py, cross_tokenizer.py, topk.py; hidden.py, attention.py, makd.py on layerwise.py's base), layer maps
(layer_map.py), the hooks that capture mapped layers' features (capture.py) and a batch's features as models and
terms read them (features.py).
"""

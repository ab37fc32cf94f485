"""Objectives: what a student is trained to match. The loss registry (registry.py) and its terms (logits.py,
hidden.py, attention.py, makd.py on layerwise.py's base), method presets (methods.py), layer maps
(layer_map.py) and the hooks that capture mapped layers' features (capture.py).
"""

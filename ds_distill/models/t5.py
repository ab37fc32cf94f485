"""T5 v1.1 / Flan-T5 under transformers 5: a separate LM head kept separate on every loading path."""

from __future__ import annotations

import transformers


class T5WithSeparateHead(transformers.T5ForConditionalGeneration):
    """T5 v1.1 / Flan-T5: the embedding is shared by encoder and decoder, the LM head is a matrix of its own.

    transformers 5 forces `tie_word_embeddings=True` on every T5 config (the v1.1 marker survives as
    `scale_decoder_outputs=False`) and unties the head on load only when it can compare the two tensors,
    which a ZeRO-3 partitioned load cannot: there the head silently became the embedding. Leaving the head
    out of the tied keys keeps it separate on every path. The class keeps its parent's name, so saved
    configs name the stock class that loads them.
    """

    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }


T5WithSeparateHead.__name__ = T5WithSeparateHead.__qualname__ = "T5ForConditionalGeneration"

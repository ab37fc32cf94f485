"""What an exported student carries besides weights."""

import torch
from transformers import AutoConfig, GenerationConfig

from ds_distill.models import adapter_for
from ds_distill.train.export import generation_config


def test_generation_never_emits_ids_past_the_tokenizer(tiny, tmp_path):
    config = AutoConfig.from_pretrained(tiny["t5"])
    tokenizer_size = config.vocab_size - 5  # the embedding is padded past the tokenizer, as T5's is
    teacher_dir = tmp_path / "teacher"
    GenerationConfig(decoder_start_token_id=0, eos_token_id=1, suppress_tokens=[7]).save_pretrained(teacher_dir)

    generation = generation_config(str(teacher_dir), config, tokenizer_size)
    assert generation.suppress_tokens == [7, *range(tokenizer_size, config.vocab_size)]  # the teacher's kept
    assert generation_config(None, config, config.vocab_size).suppress_tokens in (None, [])

    model = adapter_for(config).from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer_size:] = 100.0  # padded rows that would win every step
    model.generation_config = generation
    output = model.generate(input_ids=torch.tensor([[5, 6, 7, 1]]), max_new_tokens=6, do_sample=False)
    assert int(output.max()) < tokenizer_size

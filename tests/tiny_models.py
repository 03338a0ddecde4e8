"""Tiny random checkpoints (Llama, Qwen2, Qwen3) with a BPE tokenizer trained on the corpus."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from compressor.calibration.corpus import calibration_slice_path, read_abstracts

VOCAB = 384

# Hidden 96 is not a multiple of 64 or 128: group sizes must cope, like SmolLM2's 576.
CONFIGS = {
    "llama": dict(
        model_type="llama", hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    ),
    "qwen2_moe": dict(
        model_type="qwen2_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "mixtral": dict(
        model_type="mixtral", hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "gpt_oss": dict(
        model_type="gpt_oss", hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False, layer_types=["full_attention", "full_attention"],
    ),
}


def train_tiny_tokenizer(folder: Path) -> None:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(read_abstracts(calibration_slice_path()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))


def build_tiny_checkpoint(folder: Path, kind: str, tokenizer_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    torch.manual_seed(1234)
    settings = dict(CONFIGS[kind])
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **settings)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(str(folder))
    PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))
    return folder

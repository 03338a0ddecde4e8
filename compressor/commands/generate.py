"""`compress generate OUT "prompt"`: greedy text from a compressed checkpoint, run by our own kernels."""

from __future__ import annotations

import argparse

from compressor.commands.args import Parser, device_name, positive_int, quiet_transformers
from compressor.errors import ModelError


def prompt_text(text: str) -> str:
    """Refuse an empty prompt: greedy decoding needs at least one token to continue from."""
    if not text:
        raise argparse.ArgumentTypeError("the prompt is empty; give some text to continue")
    return text


def run(argv: list[str]) -> int:
    parser = Parser(prog="compress generate", description="Generate text with a compressed checkpoint (compressor.load).")
    parser.add_argument("model", help="compressed checkpoint folder")
    parser.add_argument("prompt", type=prompt_text, help="text to continue (not empty: there is nothing to continue from)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    args = parser.parse_args(argv)

    import torch

    import compressor
    from compressor.model_io import load_tokenizer

    quiet_transformers()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = compressor.load(args.model, device=device)  # first: it names a folder that is not a checkpoint
    tokenizer = load_tokenizer(args.model, args.model, False)
    if args.chat and not tokenizer.chat_template:
        raise ModelError("--chat: the tokenizer has no chat template; leave out --chat to continue the plain prompt",
                         where=args.model)
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt").to(device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0

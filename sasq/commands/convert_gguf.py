"""`python -m sasq convert-gguf IN.gguf OUT_DIR`: a llama.cpp GGUF -> an HF-style directory.

Quantized weights are dequantized to float32; the directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) loads in sasq.load and in transformers' LlamaForCausalLM.
"""
from pathlib import Path


def add_arguments(parser):
    parser.add_argument("gguf", type=Path, help="input .gguf file (LLaMA architecture)")
    parser.add_argument("out_dir", type=Path, help="output directory (created; existing files replaced)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    from sasq.io.gguf import convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, progress=not args.quiet)
    print(out)
    return 0

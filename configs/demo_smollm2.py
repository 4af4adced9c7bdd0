"""The real-backbone demo's δ-mem stage on a converted SmolLM2-135M-Instruct directory.

``python -m deltamem_jax.tools.demo`` runs the whole story (conversion, data, this stage,
evaluation). This file alone trains δ-mem on directories the demo made:

    python train.py --config=configs/demo_smollm2.py --workdir=runs/demo/memory \\
        --config.model.hf_dir=runs/demo/backbone \\
        --config.data.train=runs/demo/data/train.jsonl
"""

from deltamem_jax.training.defaults import smollm2_demo_config


def get_config():
    return smollm2_demo_config()

"""The CPU demo's δ-mem stage on an existing tiny backbone (the demo builds one first).

``python -m deltamem_jax.tools.demo`` runs the whole story (data, backbone pre-training,
this stage, evaluation). This file alone trains δ-mem on a backbone it made:

    python train.py --config=configs/demo_cpu.py --workdir=runs/demo/memory \\
        --config.model.hf_dir=runs/demo/backbone \\
        --config.data.train=runs/demo/data/train.jsonl
"""

from deltamem_jax.training.defaults import demo_config


def get_config():
    return demo_config()

"""Supervised fine-tuning of Llama 3 / 3.1 8B (Instruct or base) on chat data.

    python run.py --config configs/llama3_8b_sft.py \
        --config.model.hf_path=/ckpt/Meta-Llama-3.1-8B-Instruct \
        --config.data.train_files=train.jsonl --config.data.eval_files=eval.jsonl

Full-parameter AdamW with fp32 master weights and optimizer state, sharded over every
device (FSDP), bf16 compute, every layer recomputed in the backward pass (remat `full`).

Sized for one host of 8 x 80 GB GPUs: XLA:CPU's compiled memory for this step is ~40 GiB per
device (11 GiB of weights and Adam state, 29 GiB of temporaries; `tests/test_recipes.py`),
inside the 75% of a GPU's memory that JAX takes by default. Remat `dots` or `dots_no_batch`
would keep each layer's projection outputs (and input) for 4 x 4096 tokens per device:
~50 GiB per device of saved activations even in bf16, with the 11 GiB of state over that
limit before any temporary (XLA:CPU compiles the step to ~120 / ~116 GiB per device).
On 4 GPUs, `--config.train.grad_accum_steps=4` gives ~51 GiB per device.
"""

from jaxtune.config import defaults


def get_config():
    c = defaults()
    c.workdir = "runs/llama3_8b_sft"
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"  # see above: dots / dots_no_batch do not fit
    c.model.loss_chunk_len = 512  # logits for 512 positions at a time: 128k vocab is large
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.data.max_seq_len = 4096
    c.data.packing = True
    c.train.global_batch_size = 32
    c.train.num_epochs = 2.0
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.save_every = 500
    c.train.load_best_at_end = True
    c.optimizer.lr = 1e-5
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.0
    c.optimizer.max_grad_norm = 1.0
    c.early_stopping.patience = 3
    c.anomaly.spike_factor = 5.0
    return c

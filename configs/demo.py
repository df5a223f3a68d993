"""The default job: a tiny Llama fine-tuned on list puzzles, on CPU in a few minutes.

The model (random weights, a real BPE tokenizer with a Llama-3-style chat template) is
built deterministically on first use into demo_assets/model.
"""

import os

from jaxtune.config import defaults
from jaxtune.demo import ensure_demo_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = defaults()
    data_dir = os.path.join(ROOT, "data", "demo")
    c.workdir = "runs/demo"
    c.model.hf_path = ensure_demo_model(os.path.join(ROOT, "demo_assets", "model"), data_dir)
    c.model.compute_dtype = "float32"
    c.model.remat = "none"
    c.model.loss_chunk_len = 32  # only chunks that hold answer tokens run the lm head
    c.data.train_files = (os.path.join(data_dir, "train.jsonl"),)
    c.data.eval_files = (os.path.join(data_dir, "eval.jsonl"),)
    c.data.max_seq_len = 128
    c.train.global_batch_size = 16
    c.train.num_epochs = 6.0
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.save_every = 100
    c.train.load_best_at_end = True
    c.optimizer.lr = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.05
    c.optimizer.weight_decay = 0.01
    c.optimizer.min_lr_ratio = 0.1
    return c

"""Training throughput of jaxtune against Hugging Face PyTorch Llama + torch.optim.AdamW.

Same model shape, batch, optimizer and precision, measured alternately in one run, so the
ratio is meaningful on a noisy machine. Benchmark on one device (no fake devices).
Each framework runs in its own worker process, idle while the other is timed: in one
process each slowed the other by ~10% (their thread pools and allocators interfere).

    python tools/bench.py                       # reference shape, fp32 and bf16
    python tools/bench.py --precision bf16 --steps 20
    python tools/bench.py --compile             # compile time for 2 vs 16 layers (scan)
    python tools/bench.py --jax-only --remat dots --loss-chunk-len 64
    python tools/bench.py --trained-fraction 0.16 --loss-chunk-len 32   # SFT-like rows

MFU here is against the measured peak of a large matmul on this machine (a CPU has no
data-sheet peak for XLA); on accelerators jaxtune's logs use the device's data-sheet peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jaxtune.errors import UserError, exit_on_user_error  # noqa: E402  (after the path setup)
from jaxtune.preemption import exit_at_once_on_signals  # noqa: E402


def parse():
    from jaxtune.models.llama import REMAT_POLICIES

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=Formatter)
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--hidden", type=int, default=384, help="hidden size")
    p.add_argument("--layers", type=int, default=6, help="decoder layers")
    p.add_argument("--heads", type=int, default=6, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=6, help="key/value heads (GQA when fewer than --heads)")
    p.add_argument("--intermediate", type=int, default=1024, help="MLP intermediate size")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating jax/torch rounds; the best round counts")
    p.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both",
                   help="compute precision (weights and optimizer state are float32 either way)")
    p.add_argument("--remat", default="dots", choices=REMAT_POLICIES, help="jaxtune's remat policy (model.remat)")
    p.add_argument("--loss-chunk-len", type=int, default=0,
                   help="jaxtune's loss in chunks of this many positions (model.loss_chunk_len); 0: one chunk")
    p.add_argument("--trained-fraction", type=float, default=1.0,
                   help="share of each packed sample's positions that train (SFT answers); 1.0: every position")
    p.add_argument("--jax-only", action="store_true", help="time jaxtune alone (no torch needed)")
    p.add_argument("--compile", action="store_true",
                   help="measure jaxtune's compile time for 2 vs 16 layers instead (shape and precision flags apply)")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)  # internal: one timed side
    a = p.parse_args()
    if a.compile:  # it compiles 2 and 16 layers, times no step and runs no torch
        ignored = [f"--{name.replace('_', '-')}" for name in ("layers", "steps", "rounds", "trained_fraction")
                   if getattr(a, name) != p.get_default(name)]
        if ignored:
            p.error(f"--compile measures 2 and 16 layers and times no step: {', '.join(ignored)} would change nothing.")
    if not 0.0 < a.trained_fraction <= 1.0:
        p.error("--trained-fraction must be in (0, 1].")
    for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "intermediate", "batch", "seq", "steps", "rounds"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1.")
    if a.loss_chunk_len < 0 or (a.loss_chunk_len and a.seq % a.loss_chunk_len):
        p.error("--loss-chunk-len must be 0 or divide --seq.")
    if a.hidden % a.heads:
        p.error("--hidden must be a multiple of --heads.")
    return a


def trained_positions(a):
    """[batch, seq] 0/1: rows of packed 64-token samples whose last `trained_fraction` trains
    (the answer after a prompt, as in SFT data); all ones for the default 1.0. A row's last
    position has no next token, so it trains nothing (as in torch, whose labels shift)."""
    import numpy as np

    weights = np.zeros((a.batch, a.seq), np.float32)
    sample = min(64, a.seq)
    answer = max(1, round(sample * a.trained_fraction))
    for start in range(0, a.seq, sample):
        end = min(start + sample, a.seq)
        weights[:, max(start, end - answer):end] = 1.0
    weights[:, -1] = 0.0
    return weights


def llama_config(a, layers=None):
    from jaxtune.models.llama import LlamaConfig

    return LlamaConfig.from_hf_dict(dict(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
        num_hidden_layers=layers or a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        max_position_embeddings=max(2048, a.seq),
    ))


class JaxRunner:
    def __init__(self, a, compute_dtype, layers=None):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from jaxtune import sharding
        from jaxtune.models.llama import Llama
        from jaxtune.optim import OptimizerSettings, build_optimizer, lr_schedule
        from jaxtune.state import TrainState
        from jaxtune.steps import StepSettings, make_train_step, state_shardings, to_global_batch

        config = llama_config(a, layers)
        self.mesh = sharding.make_mesh(sharding.MeshShape(1, 1, 1), devices=jax.devices()[:1])
        model = Llama(config, compute_dtype=compute_dtype, remat=a.remat, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        params = nnx.as_pure(state)
        opt_settings = OptimizerSettings(lr=1e-4, weight_decay=0.01)
        optimizer = build_optimizer(opt_settings, 1000)
        train_state = TrainState.create(params, optimizer.init(params), 32)
        shardings = state_shardings(self.mesh, optimizer, train_state)
        self.state = jax.device_put(train_state, shardings)
        step_settings = StepSettings(jnp.dtype(compute_dtype), a.loss_chunk_len, 0.0)
        self.step_fn = make_train_step(graphdef, optimizer, lr_schedule(opt_settings, 1000), step_settings,
                                       self.mesh, shardings)
        rng = np.random.RandomState(0)
        ids = rng.randint(0, a.vocab, (a.batch, a.seq)).astype(np.int32)

        class Rows:
            input_ids = ids
            targets = np.roll(ids, -1, axis=1)
            loss_weights = trained_positions(a)
            positions = np.broadcast_to(np.arange(a.seq, dtype=np.int32), ids.shape).copy()
            segment_ids = np.ones_like(ids)

        self.batch = to_global_batch(Rows, self.mesh, 1)
        self.jax = jax

    def compile_seconds(self) -> float:
        t = time.perf_counter()
        self.step_fn.lower(self.state, self.batch).compile()
        return time.perf_counter() - t

    def run(self, steps: int) -> float:
        metrics = None
        t = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step_fn(self.state, self.batch)
        self.jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t


class TorchRunner:
    def __init__(self, a, bf16: bool):
        import torch
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
            num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
            max_position_embeddings=max(2048, a.seq),
        )
        cfg._attn_implementation = "sdpa"
        self.model = transformers.LlamaForCausalLM(cfg).train()
        # fused: the HF Trainer's default optimizer (adamw_torch_fused) with this torch, and 3x faster
        # than the default per-tensor loop on CPU.
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        self.ids = torch.randint(0, a.vocab, (a.batch, a.seq))
        # transformers shifts labels: labels[:, t + 1] is the target trained at position t
        self.labels = self.ids.clone()
        untrained = torch.from_numpy(trained_positions(a) == 0)
        self.labels[:, 1:][untrained[:, :-1]] = -100
        self.bf16 = bf16
        self.torch = torch

    def run(self, steps: int) -> float:
        torch = self.torch
        t = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.model(input_ids=self.ids, labels=self.labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t


def matmul_peak(dtype_name: str) -> float:
    import jax
    import jax.numpy as jnp

    n = 2048
    dtype = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def serve(a) -> None:
    """Worker process: build one side, then time rounds on request ("run N" -> seconds)."""
    import json

    compute = compute_dtype(a.precision)
    if a.worker == "jax":
        import jax

        runner = JaxRunner(a, compute)
        ready = {"compile_s": runner.compile_seconds(), "device": jax.devices()[0].device_kind}
    else:
        runner = TorchRunner(a, a.precision == "bf16")
        ready = {}
    runner.run(2)  # warm-up: compilation, allocator, thread pools
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            # The first step after the other side's round is 20-30% slower (measured for
            # jaxtune); training runs steps back to back, so that one is not timed.
            runner.run(1)
            reply = {"seconds": runner.run(int(arg))}
        elif cmd == "peak":
            reply = {"flops": matmul_peak(a.precision)}
        else:
            return
        print(json.dumps(reply), flush=True)


class Worker:
    """One side of the benchmark in its own process (see the module docstring)."""

    def __init__(self, side: str, precision: str):
        import subprocess

        self.side = side
        argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", side, "--precision", precision]
        # stderr passes through (warnings, and a worker's one-line error)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._reply()

    def _reply(self) -> dict:
        import json

        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise UserError(f"the {self.side} worker exited with status {code}; its error is above.")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def require_torch() -> None:
    """torch is a test dependency only: without it the torch worker died with a traceback."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise UserError("tools/bench.py compares against PyTorch, which is not installed: install it with "
                        "`bash tools/install.sh --test` (a CPU build), or pass --jax-only.")


def native_bf16_matmul(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has bf16 matrix instructions (None: cannot tell, not Linux). Without
    them both stacks emulate bf16 products: on an AVX2 EPYC torch's autocast step ran at 44
    tokens/s against 1,043 in fp32, and jaxtune's bf16 step was slower than its fp32 one."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


def bench_precision(a, precision: str) -> None:
    from jaxtune.flops import flops_per_token

    if precision == "bf16" and native_bf16_matmul() is False:
        print("[bf16] note: this CPU has no bf16 matrix instructions (avx512_bf16, amx_bf16), so both "
              "stacks emulate bf16 products (torch's autocast very slowly): the bf16 ratio says little "
              "about a CPU that has them, and float32 compute is the faster choice here.", flush=True)
    jax_side = Worker("jax", precision)
    torch_side = None
    try:
        print(f"[{precision}] jaxtune compile on {jax_side.ready['device']}: {jax_side.ready['compile_s']:.1f} s", flush=True)
        torch_side = None if a.jax_only else Worker("torch", precision)
        tokens = a.batch * a.seq * a.steps
        jax_rounds, torch_rounds = [], []
        for _ in range(a.rounds):
            jax_rounds.append(jax_side.ask(f"run {a.steps}")["seconds"])
            if torch_side:
                torch_rounds.append(torch_side.ask(f"run {a.steps}")["seconds"])
        peak = jax_side.ask("peak")["flops"]
    finally:
        for side in (jax_side, torch_side):
            if side:
                side.close()
    jax_tps = tokens / min(jax_rounds)
    mfu = jax_tps * flops_per_token(llama_config(a), a.seq) / peak
    line = f"[{precision}] jaxtune {jax_tps:,.0f} tokens/s (MFU {mfu:.1%} of a {peak / 1e9:.0f} GFLOP/s matmul)"
    if torch_side:
        torch_tps = tokens / min(torch_rounds)
        torch_mfu = torch_tps * flops_per_token(llama_config(a), a.seq) / peak
        line += f" | torch {torch_tps:,.0f} tokens/s (MFU {torch_mfu:.1%}) | ratio jaxtune/torch {jax_tps / torch_tps:.2f}x"
        if a.rounds > 1:
            line += f" (per-round ratios: {paired_ratios(jax_rounds, torch_rounds)})"
    print(line, flush=True)


def paired_ratios(jax_rounds: list[float], torch_rounds: list[float]) -> str:
    """Each round's jaxtune/torch speed ratio, from the two sides' back-to-back rounds, as
    "median M, range LO-HI": how far the best-of ratio can be trusted on a noisy machine,
    where a slow spell lasting minutes slows whichever side it falls on."""
    import statistics

    ratios = [t / j for j, t in zip(jax_rounds, torch_rounds)]
    return f"median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x"


def bench_compile(a) -> None:
    for precision in precisions(a):
        times = {}
        for layers in (2, 16):
            times[layers] = JaxRunner(a, compute_dtype(precision), layers=layers).compile_seconds()
            print(f"[{precision}] compile, {layers} layers: {times[layers]:.2f} s", flush=True)
        print(f"[{precision}] ratio 16/2 layers: {times[16] / times[2]:.2f}x")


def precisions(a) -> tuple[str, ...]:
    return ("fp32", "bf16") if a.precision == "both" else (a.precision,)


def compute_dtype(precision: str) -> str:
    return "bfloat16" if precision == "bf16" else "float32"


def main():
    from jaxtune.host_memory import reexec_with_huge_pages

    # As run.py does (it may restart this command once); torch's allocations get it too.
    reexec_with_huge_pages()
    a = parse()
    if a.worker:
        return serve(a)
    import jax

    print(f"jax {jax.__version__}; shape vocab={a.vocab} hidden={a.hidden} "
          f"layers={'2 and 16' if a.compile else a.layers} heads={a.heads}/{a.kv_heads} ffn={a.intermediate}; "
          f"batch {a.batch}x{a.seq}; "
          f"remat={a.remat} loss_chunk_len={a.loss_chunk_len} trained={a.trained_fraction:.0%}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}",
          flush=True)
    if a.compile:
        return bench_compile(a)
    llama_config(a)  # the shape errors a worker would find, reported here in one line
    if not a.jax_only:
        require_torch()
    for precision in precisions(a):
        bench_precision(a, precision)


if __name__ == "__main__":
    exit_at_once_on_signals()  # a Ctrl-C during the imports in main() ends it, as in run.py
    with exit_on_user_error():  # e.g. heads not a multiple of kv heads
        main()

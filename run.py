"""jaxtune launcher: `python run.py [--config configs/NAME.py] [--config.KEY=VALUE ...]`.

Without arguments it runs the demo (configs/demo.py). Run the same command on every host
of a TPU pod; rerun it after a preemption to continue.
"""

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "demo.py")


def main(argv):
    from jaxtune.errors import exit_on_user_error
    from jaxtune.host_memory import reexec_with_huge_pages

    with exit_on_user_error():
        reexec_with_huge_pages()  # may restart this command once; see jaxtune/host_memory.py
    from jaxtune.distributed import exit_promptly_on_failure  # imports JAX: after the restart

    with exit_promptly_on_failure(), exit_on_user_error():
        from jaxtune.config import parse_args

        config = parse_args(argv, DEFAULT_CONFIG)
        from jaxtune import distributed
        from jaxtune.train import run

        result = run(config)
        if result.stop_reason == "preempted":
            return 0
        last_eval = next((r for r in reversed(result.history) if r.get("eval_loss") is not None), None)
        summary = f"done: {result.step} steps ({result.stop_reason})"
        if last_eval:
            summary += f"; eval_loss {last_eval['eval_loss']:.4f}, eval_accuracy {last_eval['eval_accuracy']:.3f}"
        if distributed.is_main():  # only process 0 prints
            print(summary + f"; outputs in {result.workdir}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from jaxtune.preemption import exit_at_once_on_signals

    exit_at_once_on_signals()
    sys.exit(main(sys.argv[1:]))

"""Two JAX processes on this machine (one CPU device each, gloo collectives), as on two hosts."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from data_helpers import llama3_dir, plain_dir, write_jsonl  # noqa: F401
from run_helpers import ROOT, read_metrics, write_recipe

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_two_processes(argv: list[str], count: int = 2) -> tuple[list[subprocess.Popen], list]:
    """`argv` started as process 0 and 1 (... count - 1) of one job; (processes, their output files)."""
    port = _free_port()
    procs, logs = [], []
    for i in range(count):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(count),
               "JAX_PROCESS_ID": str(i), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        logs.append(tempfile.TemporaryFile("w+"))  # files, not pipes: an unread full pipe would block a process
        procs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
    return procs, logs


def _two_processes(argv: list[str], timeout: float, count: int = 2) -> list[tuple[int, str]]:
    """Runs `argv` as process 0 and 1 (... count - 1) of one job; [(returncode, output)] in process order.

    A hung job is killed with SIGKILL: JAX's preemption notifier catches SIGTERM.
    """
    procs, logs = _start_two_processes(argv, count)
    deadline = time.monotonic() + timeout
    hung = False
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung = True
    if hung:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    if hung:
        pytest.fail("the 2-process job hung; last output:\n" + "\n---\n".join(o[-3000:] for o in outs))
    return [(p.returncode, out) for p, out in zip(procs, outs)]


def _assert_ok(results):
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{out[-4000:]}"


def test_two_checkpoint_managers_save_the_same_step_in_a_two_process_job(tmp_path):
    """checkpoints/<step> and best/<step> finish in two background threads at once; Orbax names
    its barriers after the step, so the managers need their own barrier prefixes."""
    script = tmp_path / "saves.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from jaxtune import distributed
        distributed.init()
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxtune.checkpoint import Checkpointer
        from jaxtune.state import LoopState
        mesh = Mesh(np.array(jax.devices()), ("x",))
        x = jax.make_array_from_callback((2, 256), NamedSharding(mesh, P("x")), lambda i: np.ones((1, 256), "f4"))
        ckpt = Checkpointer({str(tmp_path / "w")!r}, keep=2, keep_best=1, metric="eval_loss",
                            greater_is_better=False)
        for step in range(1, 7):
            ckpt.save(step, {{"x": x}}, LoopState())
            ckpt.save_best(step, {{"x": x}}, 1.0 / step, {{}})
        ckpt.close()
        print("saved", ckpt.steps(), ckpt.best_step())
    """))
    results = _two_processes([sys.executable, str(script)], timeout=120)
    _assert_ok(results)
    assert all("saved [5, 6] 6" in out for _, out in results)
    for d in ("checkpoints", "best"):
        assert not [n for n in os.listdir(tmp_path / "w" / d) if "tmp" in n]


def test_from_pretrained_without_a_sharding_works_on_every_process(run_assets, tmp_path):
    """The default placement was jax.devices()[0], process 0's device: every other process
    failed with JAX's "the Array has no addressable shards"."""
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from jaxtune import distributed
        distributed.init()
        import jax.numpy as jnp
        import jaxtune
        model = jaxtune.from_pretrained({str(run_assets.model)!r})
        print("logits", float(model(jnp.array([[1, 2, 3, 4]])).sum()))
    """))
    results = _two_processes([sys.executable, str(script)], timeout=120)
    _assert_ok(results)
    lines = [[line for line in out.splitlines() if line.startswith("logits")] for _, out in results]
    assert len(lines[0]) == 1 and lines[0] == lines[1]


def _preparing_script(tmp_path, tokenizer_dir: str, body: str):
    """A script that prepares data as one of two processes: `body` has `settings`, `tok`,
    `prepare_datasets`, `UserError` and `kw` (this process's arguments) at hand."""
    script = tmp_path / "prepare.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from jaxtune import distributed
        distributed.init()
        import jax
        from data_helpers import settings
        from jaxtune.data import load_tokenizer, prepare_datasets
        from jaxtune.errors import UserError
        tok = load_tokenizer({tokenizer_dir!r})
        kw = dict(process_index=jax.process_index(), process_count=2, log=lambda m: None, gather=distributed.gather)
    """) + textwrap.dedent(body))
    return script


def test_whether_a_split_was_all_dropped_is_decided_by_every_process_together(tmp_path, plain_dir):
    """Each process judged its own slice: an eval set whose only good record was process 0's
    stopped process 1 (while the set as a whole was usable), and process 0 then waited in its
    next collective until gloo gave up, with a traceback."""
    long_text = {"text": "the quick brown fox jumps " * 20}  # dropped: longer than max_seq_len
    data = {"train": [{"text": "hello world"}, {"text": "good morning"}], "eval": [{"text": "hi there"}, long_text],
            "bad_train": [{"text": "hello world"}, long_text]}
    for name, records in data.items():
        write_jsonl(tmp_path / f"{name}.jsonl", records)
    script = _preparing_script(tmp_path, plain_dir, f"""
        got = prepare_datasets(settings({str(tmp_path / "train.jsonl")!r}, {plain_dir!r}, max_seq_len=16,
                               truncation="drop", eval_files=({str(tmp_path / "eval.jsonl")!r},)), tok, **kw)
        print("eval samples", got.report.eval.samples)
        try:
            prepare_datasets(settings({str(tmp_path / "bad_train.jsonl")!r}, {plain_dir!r}, max_seq_len=16,
                                      truncation="drop"), tok, **kw)
        except UserError as e:
            print("error:", e)
    """)
    results = _two_processes([sys.executable, str(script)], timeout=120)
    _assert_ok(results)
    assert "eval samples 1" in results[0][1] and "eval samples 0" in results[1][1]
    errors = [[line for line in out.splitlines() if line.startswith("error:")] for _, out in results]
    assert errors[0] == errors[1] == [
        "error: all 1 train sample(s) in process 1's slice of 2 were dropped (1 longer than data.max_seq_len=16); "
        "raise data.max_seq_len, use data.truncation=truncate, or fix the data."]


def test_a_bad_record_in_one_process_share_stops_every_process_with_its_message(tmp_path, llama3_dir):
    """Only the process whose share holds a record the chat template cannot render finds it: it
    stopped alone, and the other waited in its next collective until gloo gave up (a traceback,
    exit 1, and no word of the record), or, when process 0 stopped, died of SIGABRT."""
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]}
    files = {"good": [good] * 4,
             "one": [good, bad, good, good],  # record 1: process 1's share
             "two": [good, good, bad, good],  # record 2: process 0's
             "both": [good, good, good, bad, bad],  # records 3 (process 1's) and 4 (0's): 3 comes first
             "eval": [good, good, bad]}
    for name, records in files.items():
        write_jsonl(tmp_path / f"{name}.jsonl", records)
    cases = [("one", None, "one.jsonl:2:"), ("two", None, "two.jsonl:3:"), ("both", None, "both.jsonl:4:"),
             ("good", "eval", "eval.jsonl:3:")]
    script = _preparing_script(tmp_path, llama3_dir, f"""
        path = lambda name: {str(tmp_path)!r} + "/" + name + ".jsonl"
        for train, evals, _ in {cases!r}:
            try:
                prepare_datasets(settings(path(train), {llama3_dir!r}, eval_files=(path(evals),) if evals else ()),
                                 tok, **kw)
                print("error: none")
            except UserError as e:
                print("error:", e)
        print("done")
    """)
    results = _two_processes([sys.executable, str(script)], timeout=180)
    _assert_ok(results)
    errors = [[line for line in out.splitlines() if line.startswith("error:")] for _, out in results]
    assert errors[0] == errors[1], errors
    assert len(errors[0]) == len(cases) and all("done" in out for _, out in results)
    for error, (_, _, where) in zip(errors[0], cases):
        assert where in error and "the conversation starts with an assistant turn" in error, error
        assert error.endswith("set data.on_bad_record=skip to skip bad records."), error

    # Skipped instead: process 0, which alone prints, counted only those of its own share.
    script = _preparing_script(tmp_path, llama3_dir, f"""
        for name in ("one", "both"):
            got = prepare_datasets(settings({str(tmp_path)!r} + "/" + name + ".jsonl", {llama3_dir!r},
                                            on_bad_record="skip"), tok, **kw)
            print("skipped:", got.report.summary().splitlines()[1])
    """)
    results = _two_processes([sys.executable, str(script)], timeout=180)
    _assert_ok(results)
    lines = [line for line in results[0][1].splitlines() if line.startswith("skipped:")]
    assert len(lines) == 2, results[0][1]
    examples = [re.findall(r"/(\w+\.jsonl:\d+): the conversation starts with an assistant turn", line) for line in lines]
    assert lines[0].startswith("skipped: skipped 1 bad record(s) (1 in other processes' shares), e.g. ")
    assert lines[1].startswith("skipped: skipped 2 bad record(s) (1 in other processes' shares), e.g. ")
    assert examples == [["one.jsonl:2"], ["both.jsonl:5", "both.jsonl:4"]]  # its own first, then the others'


def test_two_process_run_saves_evaluates_and_resumes(tiny, tmp_path):
    workdir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.py", tiny(**{"train.max_steps": 8, "train.eval_every": 2,
                                                          "train.save_every": 2, "checkpoint.keep": 4}))
    argv = [sys.executable, os.path.join(ROOT, "run.py"), "--config", recipe]
    first = _two_processes(argv, timeout=240)
    _assert_ok(first)
    assert "done: 8 steps" in first[0][1] and "done:" not in first[1][1]  # only process 0 prints
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6", "8"]
    assert [n for n in os.listdir(workdir / "best") if n.isdigit()]
    assert not [n for d in ("checkpoints", "best") for n in os.listdir(workdir / d) if "tmp" in n]

    results = _two_processes([*argv, "--config.train.max_steps=10"], timeout=240)
    _assert_ok(results)
    assert "resuming from step 8" in results[0][1]
    steps = [r["step"] for r in read_metrics(workdir) if r.get("loss") is not None]
    assert steps == list(range(1, 11))

    # One process packs and shuffles all rows itself: the saved position means other batches.
    alone = subprocess.run([*argv, "--config.train.max_steps=12"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, timeout=240)
    assert alone.returncode == 2, alone.stderr[-3000:]
    assert "the number of processes was 2, now 1" in alone.stderr


def test_when_one_process_dies_the_other_exits_promptly(tiny, tmp_path):
    """Process 1 killed mid-run: process 0's next collective failed at once, but its exit then
    waited ~90 s in jax.distributed's shutdown barrier for a process that was gone, and
    ended in SIGABRT (exit -6) with a native stack dump."""
    workdir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.py", tiny(**{"train.max_steps": 500, "train.eval_every": 0,
                                                          "train.save_every": 1000}))
    procs, logs = _start_two_processes([sys.executable, os.path.join(ROOT, "run.py"), "--config", recipe])
    try:
        deadline = time.monotonic() + 180
        while not (os.path.exists(workdir / "metrics.jsonl") and len(read_metrics(workdir)) >= 3):
            assert time.monotonic() < deadline and procs[0].poll() is None, "the job did not start training"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        returncode = procs[0].wait(timeout=80)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    logs[0].seek(0)
    out = logs[0].read()
    assert returncode == 1 and waited < 30, (returncode, waited, out[-3000:])
    assert "error: process 0 of 2 failed; exiting without waiting for the others" in out


def test_wandb_that_cannot_log_in_stops_every_process_with_its_message(tiny, tmp_path, monkeypatch):
    """Only process 0 logs to W&B, so only it checked the login: it stopped with the error, and
    process 1 died of SIGABRT with a native stack dump when the coordinator went away."""
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("def login(verify=False):\n"
                                      "    raise RuntimeError('api_key not configured (no-tty)')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    recipe = write_recipe(tmp_path / "recipe.py", tiny(**{"logging.wandb": True}))
    results = _two_processes([sys.executable, os.path.join(ROOT, "run.py"), "--config", recipe], timeout=120)
    expected = ("error: logging.wandb=True but W&B did not start (api_key not configured (no-tty)); run `wandb "
                "login`, set WANDB_MODE=offline, or set logging.wandb=False.")
    for i, (rc, out) in enumerate(results):
        assert rc == 2 and out.strip().splitlines()[-1] == expected, f"process {i} exited {rc}:\n{out[-3000:]}"
        assert "Traceback" not in out


@pytest.mark.parametrize("failing, count", [(1, 2), (0, 2), (1, 3)])
def test_a_user_error_on_one_process_stops_the_others_at_once_with_its_message(tiny, tmp_path, failing, count):
    """A host without the model (local disks differ): the process that found it stopped, and the
    other waited in its next collective until the coordination service noticed the missing
    heartbeats (~100 s), then died of SIGABRT with a native stack dump and no word of why.
    With three, process 0 read the stop first and exited, taking the service from process 2."""
    recipe = write_recipe(tmp_path / "recipe.py", tiny(**{"train.global_batch_size": 2 * count, "mesh.data": -1,
                                                          "mesh.fsdp": 1}))  # 3 divides no model size
    with open(recipe, "a") as f:  # only the failing process's host lacks the model
        f.write(textwrap.dedent(f"""
            _same_everywhere = get_config


            def get_config():
                import os
                config = _same_everywhere()
                if os.environ["JAX_PROCESS_ID"] == "{failing}":
                    config.model.hf_path = {str(tmp_path / "missing")!r}
                return config
        """))
    started = time.monotonic()
    results = _two_processes([sys.executable, os.path.join(ROOT, "run.py"), "--config", recipe], timeout=120,
                             count=count)
    took = time.monotonic() - started
    message = f"model directory {tmp_path / 'missing'} does not exist (jaxtune never downloads from a hub)."
    assert results[failing][0] == 2 and results[failing][1].strip().splitlines()[-1] == f"error: {message}"
    for other in set(range(count)) - {failing}:
        assert results[other][0] == 2, results[other][1][-3000:]
        assert results[other][1].strip().splitlines()[-1] == f"error: process {failing} of {count} stopped: {message}"
    assert took < 60, took


@pytest.mark.parametrize("how", ["before training", "twice in training"])
def test_a_signal_that_ends_one_process_at_once_stops_the_others_with_it(tmp_path, how):
    """SIGTERM before training (nothing to save) or a second one during it ends that process at
    once; the others waited in their collective for it (~40 s, then a misleading traceback; when
    process 0 was signalled, SIGABRT)."""
    script = tmp_path / "signalled.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        from jaxtune import distributed
        from jaxtune.preemption import ExitOnSignal, StopRequest
        distributed.init()
        import jax
        if jax.process_index() == 1:
            if {how!r} == "before training":
                with ExitOnSignal():
                    os.kill(os.getpid(), signal.SIGTERM)
            else:
                with StopRequest():
                    os.kill(os.getpid(), signal.SIGTERM)  # the graceful stop, asked for
                    os.kill(os.getpid(), signal.SIGTERM)  # and again: at once
        distributed.gather(1)  # where process 0 waits for it
        print("not stopped")
    """))
    started = time.monotonic()
    results = _two_processes([sys.executable, str(script)], timeout=60)
    took = time.monotonic() - started
    when = " before training started" if how == "before training" else " twice"
    assert results[1][0] == 128 + signal.SIGTERM, results[1][1][-2000:]
    assert results[0][0] == 128 + signal.SIGTERM, results[0][1][-2000:]
    assert results[0][1].strip().splitlines()[-1] == f"error: process 1 of 2 stopped: it received SIGTERM{when}"
    assert took < 20, took

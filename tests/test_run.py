"""run.py end to end: config errors, what a run writes, evaluation, MFU, the demo."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from jaxtune.config import apply_override, defaults, load_recipe, settings_without_effect, validate
from jaxtune.errors import UserError
from jaxtune.train import run
from helpers import edit_config
from run_helpers import ROOT, make_config, read_metrics, run_py, tensorboard_scalars, write_recipe


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.optimizer.nope=1"], "unknown config key 'optimizer.nope'"),
        (["--config.train.eval_evry=5"], "train has no 'eval_evry' (did you mean 'train.eval_every'? it has: "),
        (["--config.trian.max_steps=5"], "config has no 'trian' (did you mean 'train.max_steps'? it has: "),
        (["--config.train.global_batch_size=abc"], "--config.train.global_batch_size expects a value of type int"),
        (["--config.checkpoint.greater_is_better=maybe"], "--config.checkpoint.greater_is_better expects true or false"),
        (["--config.optimizer.schedule=exponential"], "optimizer.schedule must be one of"),
        (["--config.train.global_batch_size=6", "--config.train.grad_accum_steps=4"], "must be a multiple of"),
        (["--config", "configs/missing.py"], "config file configs/missing.py does not exist"),
        (["--config.train.load_best_at_end=True", "--config.data.eval_files=", "--config.data.eval_fraction=0"],
         "train.load_best_at_end needs evaluation data"),
        (["--config.model.remat=sometimes"], "model.remat must be one of"),
        (["positional"], "unexpected argument 'positional'"),
        (["--config", "README.md"], "config file README.md is not a Python recipe"),
        (["--config.data.max_seq_len=None"], "data.max_seq_len must be an integer, got None"),
        (["--config.data.eval_fraction=None"], "data.eval_fraction must be a finite number, got None"),
        (["--config.data.train_files=['a.jsonl', 1]"], "data.train_files must be a list of paths (strings)"),
        (["--config.train.num_epochs=1e400"], "train.num_epochs must be a finite number, got inf"),
        (["--config.model.param_dtype=float16"], "model.param_dtype=float16 cannot hold Adam's state"),
        (["--config.optimizer.schedule=constant", "--config.optimizer.min_lr_ratio=0.1"],
         "optimizer.min_lr_ratio has no effect with optimizer.schedule=constant"),
        (["--config.model.hf_path=gs://bucket/llama"], "model.hf_path gs://bucket/llama is a URL; jaxtune reads"),
        (["--config.data.train_files=a.jsonl,s3://b/train.jsonl"], "data.train_files s3://b/train.jsonl is a URL"),
    ],
)
def test_config_errors_are_one_line_before_any_work(args, message, tmp_path):
    workdir = tmp_path / "never"
    result = run_py(*args, f"--config.workdir={workdir}", timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not workdir.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        # the next option was taken as the value: a workdir named "--config.train.max_steps=2"
        (["--config.workdir", "--config.train.max_steps=2"], "--config.workdir needs a value"),
        (["--config.optimizer.lr=True"], "--config.optimizer.lr expects a value of type float, got 'True'"),  # was 1.0
        (["--config.train.max_steps=True"], "--config.train.max_steps expects a value of type int, got 'True'"),
        (["--config.train.overwrite=True"], "train.overwrite=True only applies with train.resume=never"),
        (["--config.train.max_steps=3000000000"], "train.max_steps must be below 2**31"),  # an OverflowError, late
        (["--config", "configs"], "config file configs is a directory"),
        (["--config.data.train_files=(5)"], "data.train_files must be a list of paths (strings), got (5,)"),  # TypeError
        # accepted silently: ignored (max_steps overrides it), or with no effect (no early stopping)
        (["--config.train.num_epochs=-3", "--config.train.max_steps=2"], "train.num_epochs must be positive, got -3.0"),
        (["--config.early_stopping.min_delta=0.5"], "early_stopping.min_delta has no effect without "
                                                    "early_stopping.patience > 0"),
        # a traceback after tokenizing (a 32 GiB array); positions are int32
        (["--config.data.max_seq_len=8589934592"], "data.max_seq_len must be below 2**31 (positions are int32)"),
        # a [10**9] float32 buffer on every device, sorted every step
        (["--config.anomaly.window=1000000000"], "anomaly.window must be at most 10,000 steps"),
    ],
)
def test_more_command_line_mistakes_are_one_clear_error(args, message):
    from jaxtune.config import parse_args

    with pytest.raises(UserError, match=re.escape(message)):
        parse_args(args, os.path.join(ROOT, "configs", "demo.py"))


def test_a_parenthesised_file_name_is_one_file_not_its_characters():
    from jaxtune.config import parse_args

    config = parse_args(['--config.data.train_files=("a.jsonl")'], os.path.join(ROOT, "configs", "demo.py"))
    assert config.data.train_files == ("a.jsonl",)  # was ("a", ".", "j", ...)


@pytest.mark.parametrize(
    "text, message",
    [
        ("def get_config(:\n    pass\n", ":1: syntax error"),
        ("import no_such_module_here\n", "failed to load: ModuleNotFoundError"),
        ("def get_config():\n    return undefined_name\n", "get_config() failed: NameError"),
        ("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'workdir': 'w'})\n",
         "config key anomaly is missing (a recipe replaced its section?)"),
        # an unlocked config takes any key: the misspelt one trained for the default number of steps
        ("from jaxtune.config import defaults\ndef get_config():\n    c = defaults()\n    c.unlock()\n"
         "    c.train.max_step = 5\n    return c\n", "unknown key 'train.max_step' (did you mean 'train.max_steps'?)."),
        ("import ml_collections\nfrom jaxtune.config import defaults\ndef get_config():\n"
         "    return ml_collections.ConfigDict({**defaults().to_dict(), 'epochs': 3})\n", "unknown key 'epochs'."),
    ],
)
def test_a_recipe_that_fails_to_run_is_one_clear_error(text, message, tmp_path):
    from jaxtune.config import parse_args

    recipe = tmp_path / "recipe.py"
    recipe.write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        parse_args([], str(recipe))


@pytest.mark.parametrize(
    "line, message",
    [
        ("c.train.max_step = 5", "unknown key 'max_step' (did you mean 'max_steps'?)"),
        ("c.optimizer.learning_rate = 1e-3", "unknown key 'learning_rate'"),
        # ml_collections' "Could not override field 'train_files' (reference). ... cannot be casted to type <class 'tuple'>"
        ("c.data.train_files = ('train.jsonl')", "train_files must be of type tuple, got the str 'train.jsonl' "
                                                 "(one item is (\"train.jsonl\",), with the comma)."),
        ("c.train.max_steps = '5'", "max_steps must be of type int, got the str '5'."),
        ("c.model.hf_path = 5", "hf_path must be of type str, got the int 5."),  # was "got the int '5'"
        # was ml_collections' own "Could not override field 'max_steps' (reference). 2 is of original type ..."
        ("c.train.max_steps = __import__('numpy').int64(2)", "max_steps must be of type int, got the numpy.int64 2."),
    ],
)
def test_a_recipe_that_sets_a_misspelt_key_or_a_wrong_type_is_refused(line, message, tmp_path):
    recipe = _recipe(tmp_path, line)
    # with the recipe's line: ml_collections names the last key only
    with pytest.raises(UserError, match=re.escape(f"config file {recipe}:6: {message}")):
        load_recipe(recipe)


def _recipe(tmp_path, *lines) -> str:
    recipe = tmp_path / "recipe.py"
    body = "".join(f"    {line}\n" for line in lines)
    recipe.write_text(f"import pathlib\nfrom jaxtune.config import defaults\n\ndef get_config():\n"
                      f"    c = defaults()\n{body}    return c\n")
    return str(recipe)


@pytest.mark.parametrize(
    "line, message",
    [
        ("c.data.train_files = (pathlib.Path('train.jsonl'),)", "data.train_files must be a list of paths (strings)"),
        ("c.data.eval_fraction = None", "data.eval_fraction must be a finite number, got None"),
        ("c.train.seed = True", "train.seed must be an integer, got True"),
    ],
)
def test_a_recipe_value_of_the_wrong_kind_is_named(line, message, tmp_path):
    config = load_recipe(_recipe(tmp_path, "c.model.hf_path = 'model'", "c.data.train_files = ('t.jsonl',)", line))
    with pytest.raises(UserError, match=re.escape(message)):
        validate(config)


@pytest.mark.parametrize("text, value", [("1", True), ("yes", True), ("false", False), ("0", False)])
def test_a_placeholder_bool_takes_the_spellings_of_a_bool(text, value):
    config = defaults()
    apply_override(config, "checkpoint.greater_is_better", text)
    assert config.checkpoint.greater_is_better is value


@pytest.mark.parametrize("text", ["None", "null"])
def test_a_placeholder_set_by_a_recipe_can_be_unset_from_the_command_line(text, tmp_path):
    """A recipe's greater_is_better=True could not be turned back into "inferred from the
    metric's name": None was refused as not a bool."""
    config = load_recipe(_recipe(tmp_path, "c.checkpoint.greater_is_better = True"))
    apply_override(config, "checkpoint.greater_is_better", text)
    assert config.checkpoint.greater_is_better is None
    apply_override(config, "train.max_steps", "None")  # only keys that are unset by default may be
    with pytest.raises(UserError, match="train.max_steps must be an integer, got None"):
        validate(config)


def test_a_workdir_that_is_a_file_is_refused(tiny, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("")
    with pytest.raises(UserError, match="exists and is not a directory"):
        validate(make_config(tiny(workdir=str(path))))


def test_a_workdir_that_cannot_be_created_fails_before_the_data_is_read(tiny, capsys):
    with pytest.raises(UserError, match="workdir /proc/jaxtune cannot be created"):
        run(make_config(tiny(workdir="/proc/jaxtune")))
    assert "data:" not in capsys.readouterr().out


def test_a_home_relative_workdir_model_path_and_data_files_are_expanded(tiny, run_assets, tmp_path, monkeypatch):
    """config.json records the paths read: it held `~/data/train.jsonl` as written."""
    monkeypatch.setenv("HOME", str(tmp_path))
    model = tmp_path / "models" / "tiny"
    shutil.copytree(run_assets.model, model)
    os.makedirs(tmp_path / "data")
    shutil.copy(run_assets.train, tmp_path / "data" / "train.jsonl")
    result = run(make_config(tiny(workdir="~/runs/x", model__hf_path="~/models/tiny", train__max_steps=1,
                                  train__eval_every=0, data__train_files=("~/data/train.jsonl",))))
    assert result.workdir == str(tmp_path / "runs" / "x")
    recorded = json.load(open(tmp_path / "runs" / "x" / "config.json"))
    assert recorded["model"]["hf_path"] == str(model)
    assert recorded["data"]["train_files"] == [str(tmp_path / "data" / "train.jsonl")]


@pytest.mark.parametrize("overrides, sentences", [
    ({}, []),  # the defaults: nothing to say
    ({"data.eval_fraction": 0.0, "train.eval_every": 100, "checkpoint.greater_is_better": True},
     ["there is no evaluation data (data.eval_files is empty and data.eval_fraction=0), so this setting changes "
      "nothing: checkpoint.greater_is_better=True."]),
    ({"data.eval_fraction": 0.1, "checkpoint.greater_is_better": True}, []),
    ({"data.eval_fraction": 0.0, "data.eval_files": ("e.jsonl",), "train.eval_batch_size": 4}, []),
    ({"train.max_steps": 5, "train.num_epochs": 3.0}, ["train.max_steps=5 sets the run's length, so this setting "
                                                       "changes nothing: train.num_epochs=3.0."]),
    ({"train.num_epochs": 3.0}, []),
    ({"optimizer.warmup_steps": 10, "optimizer.warmup_ratio": 0.03},
     ["optimizer.warmup_steps=10 sets the warmup, so this setting changes nothing: optimizer.warmup_ratio=0.03."]),
    ({"logging.wandb_project": "mine"}, ["logging.wandb=False, so this setting changes nothing: "
                                         "logging.wandb_project=mine."]),
    ({"logging.wandb_project": "mine", "logging.wandb": True}, []),
    ({"data.eval_files": ("e.jsonl",), "data.eval_fraction": 0.2},
     ["data.eval_files is set (a held-out fraction is used only without eval files), so this setting changes "
      "nothing: data.eval_fraction=0.2."]),
    ({"anomaly.window": 64}, ["anomaly.spike_factor=0 (no spike test), so this setting changes nothing: "
                              "anomaly.window=64."]),
    ({"anomaly.window": 64, "anomaly.spike_factor": 3.0}, []),
])
def test_settings_that_another_setting_makes_unread_are_named(overrides, sentences):
    """A key that exists changes behaviour, or the run says it does not."""
    assert settings_without_effect(make_config({"data.train_files": ("t.jsonl",), **overrides})) == sentences


def test_help_is_usage_on_stdout_and_exit_0():
    result = run_py("--help", timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: python run.py") and not result.stderr


def test_curves_show_a_single_train_point(tmp_path, monkeypatch):
    import matplotlib.figure

    from jaxtune.logging import plot_curves

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    plot_curves([{"step": 1, "loss": 6.0}], str(tmp_path / "curves.png"))
    (line,) = figures[0].axes[0].lines
    assert line.get_marker() not in (None, "None", "")  # a lone point has no line to draw


def test_a_model_directory_without_usable_weights_fails_before_the_workdir_is_touched(tiny, tmp_path):

    from safetensors.numpy import load_file, save_file

    source = tiny()["model.hf_path"]
    no_weights = tmp_path / "no_weights"
    shutil.copytree(source, no_weights)
    os.remove(no_weights / "model.safetensors")
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match="no model.safetensors"):
        run(make_config(tiny(workdir=workdir, **{"model__hf_path": str(no_weights)})))
    assert not workdir.exists()  # so train.resume=never does not refuse the next try
    missing = tmp_path / "missing_tensor"
    shutil.copytree(source, missing)
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, missing / "model.safetensors")
    with pytest.raises(UserError, match="has no tensor model.layers.1.mlp.up_proj.weight"):
        run(make_config(tiny(workdir=workdir, **{"model__hf_path": str(missing)})))
    assert not workdir.exists()
    # Shapes and extra tensors are read from the headers too, before any data is tokenized.
    for name, change, message in [
        ("fewer_layers", {"num_hidden_layers": 1}, "the checkpoint has tensors this Llama does not use"),
        ("wider_mlp", {"intermediate_size": 2048}, r"has shape \(128, 384\) but config.json implies \(128, 2048\)"),
    ]:
        edited = tmp_path / name
        shutil.copytree(source, edited)
        edit_config(edited, **change)
        with pytest.raises(UserError, match=message):
            run(make_config(tiny(workdir=workdir, **{"model__hf_path": str(edited)})))
        assert not workdir.exists()


def test_token_ids_beyond_the_models_vocabulary_are_refused(tiny, tmp_path):
    """A tokenizer with more tokens than the model has embeddings: every step used to be
    skipped as non-finite, with no word on why."""
    from helpers import make_hf_llama

    demo = tiny()["model.hf_path"]
    small = tmp_path / "small_vocab"
    with open(os.path.join(demo, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    make_hf_llama(small, vocab_size=vocab - 40)
    for name in os.listdir(demo):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(os.path.join(demo, name), small)
    with pytest.raises(UserError, match=rf"the data has token id \d+, but the model has only {vocab - 40} embeddings"):
        run(make_config(tiny(model__hf_path=str(small))))


def test_batch_that_does_not_divide_the_mesh_is_refused(tiny):
    # 8 fake devices: 4 rows per micro-batch cannot be split over fsdp=8.
    with pytest.raises(UserError, match=r"multiple of the data-parallel size \(mesh.data x mesh.fsdp = 8\)"):
        run(make_config(tiny(train__global_batch_size=4)))
    with pytest.raises(UserError, match=r"^mesh data=3 x fsdp=1 x tensor=1 uses 3 devices, but a mesh uses all 8 "
                                         r"available; set one axis to -1 to fill the rest\.$"):
        run(make_config(tiny(mesh__data=3, mesh__fsdp=1)))  # was "needs 3 devices, but 8 are available"
    # More devices than there are: said so, not "do not divide" (nor "1 devices").
    from jaxtune.sharding import MeshShape

    with pytest.raises(UserError, match=r"^the mesh axes given need at least 16 devices, but 8 are available\.$"):
        run(make_config(tiny(mesh__tensor=16)))
    with pytest.raises(UserError, match=r"^the mesh axes given need at least 2 devices, but 1 is available\.$"):
        MeshShape(2, -1, 1).resolve(1)
    with pytest.raises(UserError, match=r"^the mesh axes given \(3 devices\) do not divide the 8 devices available\.$"):
        MeshShape(3, -1, 1).resolve(8)
    with pytest.raises(UserError, match=r"^mesh data=2 x fsdp=1 x tensor=1 needs 2 devices, but 1 is available\.$"):
        MeshShape(2, 1, 1).resolve(1)


def test_a_run_writes_config_metrics_tensorboard_and_curves(tiny, tmp_path, capsys):
    overrides = tiny(logging__wandb=True, logging__peak_flops=1e12, train__log_every=2)
    result = run(make_config(overrides))
    workdir = overrides["workdir"]
    assert result.stop_reason == "completed" and result.step == 12

    with open(os.path.join(workdir, "config.json")) as f:
        written = json.load(f)
    assert written["optimizer"]["lr"] == 3e-3 and written["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert written["checkpoint"]["greater_is_better"] is False  # resolved from eval_loss

    records = read_metrics(workdir)
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4, 6, 8, 10, 12]
    captured = capsys.readouterr()
    steps_per_epoch = int(re.search(r"\((\d+) per epoch\)", captured.out).group(1))
    for r in train_lines:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "skipped"} <= set(r)
        assert r["epoch"] == round(r["step"] / steps_per_epoch, 4)  # fractional, as the HF Trainer logs it
    # MFU from the configured peak: tokens/s x FLOPs per token / (peak x devices).
    from jaxtune.flops import flops_per_token
    from jaxtune.models.llama import LlamaConfig

    fpt = flops_per_token(LlamaConfig.from_pretrained(overrides["model.hf_path"]), 64)
    r = train_lines[-1]
    assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * fpt / (1e12 * 8))
    assert [r["step"] for r in eval_lines] == [4, 8, 12]
    for r in eval_lines:
        assert r["eval_ppl"] == pytest.approx(2.718281828 ** r["eval_loss"], rel=1e-6)
        assert 0 <= r["eval_accuracy"] <= 1
    assert eval_lines[-1]["eval_loss"] < eval_lines[0]["eval_loss"]
    assert result.history == records

    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
    assert "wandb package is not installed" in captured.err


def test_without_a_peak_mfu_is_null_on_cpu(tiny):
    result = run(make_config(tiny(train__max_steps=3, train__eval_every=0)))
    assert all(r["mfu"] is None for r in result.history if "loss" in r)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v4", 275e12), ("cpu", None), ("NVIDIA GeForce RTX 4090", None),
    ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v6e", 918e12), ("TPU v4 lite", 138e12), ("NVIDIA GH200 480GB", 989e12),
])
def test_peak_is_the_data_sheet_figure_of_that_exact_device(kind, peak):
    from jaxtune.flops import peak_for_device_kind

    assert peak_for_device_kind(kind) == peak


def test_eval_fraction_holds_out_train_records(tiny):
    result = run(make_config(tiny(data__eval_files=(), data__eval_fraction=0.1, train__max_steps=4)))
    evals = [r for r in result.history if "eval_loss" in r]
    assert len(evals) == 1 and evals[0]["eval_tokens"] > 0
    result = run(make_config(tiny(workdir=str(result.workdir) + "2", data__eval_files=(), data__eval_fraction=0.0,
                                  train__max_steps=4)))
    assert not [r for r in result.history if "eval_loss" in r]


def test_run_py_cli_overrides_a_recipe(tiny, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.py", tiny(train__max_steps=3, train__eval_every=0))
    result = run_py("--config", recipe, "--config.optimizer.lr=1e-3", "--config.train.max_steps", "2")
    assert result.returncode == 0, result.stderr
    assert "done: 2 steps (completed)" in result.stdout
    workdir = tiny()["workdir"]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optimizer"]["lr"] == 1e-3


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """The default job, shortened: eval loss falls well below the first evaluation."""
    result = run_py(f"--config.workdir={tmp_path / 'demo'}", "--config.train.max_steps=120",
                    "--config.train.eval_every=40", "--config.logging.progress_bar=False", timeout=600,
                    env={"XLA_FLAGS": ""})  # one CPU device, as on a user's machine
    assert result.returncode == 0, result.stderr
    evals = [r for r in read_metrics(tmp_path / "demo") if "eval_loss" in r]
    assert len(evals) == 3
    assert evals[-1]["eval_loss"] < 0.85 * evals[0]["eval_loss"]
    assert os.path.isdir(os.path.join(ROOT, "demo_assets", "model"))


def test_the_demo_model_built_by_two_processes_at_once(tmp_path, monkeypatch):
    """Two commands on a fresh clone (or one per host) build it together: the one that
    finishes second finds the directory there and uses it, instead of failing on the rename."""
    import jaxtune.demo

    out = tmp_path / "model"

    def build(tmp, data_dir, seed=0):
        for directory in (tmp, out):  # the other process renames its copy into place meanwhile
            os.makedirs(directory, exist_ok=True)
            for name in ("config.json", "model.safetensors"):
                with open(os.path.join(directory, name), "w") as f:
                    f.write(str(directory))

    monkeypatch.setattr(jaxtune.demo, "build_model_dir", build)
    assert jaxtune.demo.ensure_demo_model(str(out), "unused") == str(out)
    assert (out / "config.json").read_text() == str(out)  # the winner's copy
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary directory left


def test_make_demo_into_a_file_is_one_clear_error(tmp_path):
    import jaxtune.demo

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="file exists and is not a directory"):
        jaxtune.demo.ensure_demo_model(str(tmp_path / "file"), "unused")
    with pytest.raises(UserError, match="cannot write the demo model under"):  # NotADirectoryError before
        jaxtune.demo.ensure_demo_model(str(tmp_path / "file" / "model"), "unused")
    # A directory with other files: the build ran, then its rename failed with a traceback.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("mine")
    with pytest.raises(UserError, match=r"other exists and is not a demo model \(no config.json\); name a new or "):
        jaxtune.demo.ensure_demo_model(str(tmp_path / "other"), "unused")
    # Without the demo data (the tokenizer is trained on it): a FileNotFoundError traceback.
    with pytest.raises(UserError, match=r"the demo data .*nodata/train.jsonl is missing; restore it from git"):
        jaxtune.demo.ensure_demo_model(str(tmp_path / "model"), str(tmp_path / "nodata"))
    assert sorted(os.listdir(tmp_path)) == ["file", "other"]  # no temporary directory left
    with pytest.raises(UserError, match=r"cannot write the demo data in .*file/data \("):
        jaxtune.demo.write_dataset(str(tmp_path / "file" / "data"))


def test_shipped_recipes_validate():
    from jaxtune.config import parse_args

    config = parse_args(["--config", os.path.join(ROOT, "configs", "llama3_8b_sft.py"),
                         "--config.model.hf_path=/ckpt/llama", "--config.data.train_files=a.jsonl,b.jsonl"],
                        default_config="unused")
    assert config.data.train_files == ("a.jsonl", "b.jsonl") and config.model.compute_dtype == "bfloat16"
    with pytest.raises(UserError, match="model.hf_path must name"):
        parse_args(["--config", os.path.join(ROOT, "configs", "llama3_8b_sft.py")], default_config="unused")


def test_learning_rate_schedule_reaches_the_optimizer(tiny):
    # warmup_steps=2, linear decay over 12 steps; a step's lr is lr(k) of its 0-based index.
    result = run(make_config(tiny(train__eval_every=0)))
    lrs = {r["step"]: r["lr"] for r in result.history if "lr" in r}
    expected = {k + 1: 3e-3 * (k / 2 if k < 2 else (12 - k) / 10) for k in range(12)}
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_param_dtype_epochs_and_seed(tiny, tmp_path, capsys):
    # train.eval_batch_size: test_config_wiring.py::test_eval_batch_size_sets_the_rows_of_every_eval_batch
    import jax.numpy as jnp

    half = run(make_config(tiny(model__param_dtype="bfloat16", train__max_steps=-1, train__num_epochs=0.5,
                                train__eval_every=0)))
    assert half.step == 13  # ceil(0.5 x 25 batches per epoch)
    assert {x.dtype for x in jax_leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    # bfloat16 rounds small updates away (a norm weight of 1 moves in steps of 2^-7): said at the start
    assert "warning: model.param_dtype=bfloat16 keeps the weights and Adam's state in bfloat16" in capsys.readouterr().out
    first = {}
    for seed in (0, 1):
        r = run(make_config(tiny(workdir=tmp_path / f"seed{seed}", train__seed=seed, train__max_steps=1,
                                 train__eval_every=0, data__eval_files=(), data__eval_fraction=0.0)))
        first[seed] = r.history
    assert first[0][0]["loss"] != first[1][0]["loss"]  # another shuffle, other batches
    assert "model.param_dtype=bfloat16" not in capsys.readouterr().out  # float32 weights: no warning


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_progress_bar_and_wandb_are_wired(tiny, monkeypatch, capsys):
    import sys
    import types

    calls = {"init": [], "log": [], "finish": 0}
    fake = types.ModuleType("wandb")
    fake.login = lambda **kw: True
    fake.init = lambda **kw: calls["init"].append(kw) or fake
    fake.log = lambda data, step: calls["log"].append((step, data))
    fake.finish = lambda: calls.__setitem__("finish", calls["finish"] + 1)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(make_config(tiny(train__max_steps=2, train__eval_every=0, logging__wandb=True,
                         logging__wandb_project="my-project", logging__progress_bar=True, logging__plot=False)))
    assert calls["init"][0]["project"] == "my-project" and calls["finish"] == 1
    assert [step for step, _ in calls["log"]] == [1, 2, 2] and "loss" in calls["log"][0][1]
    assert "2/2" in capsys.readouterr().err  # the tqdm bar
    workdir = tiny()["workdir"]
    assert not os.path.exists(os.path.join(workdir, "curves.png"))  # logging.plot=False


def test_bench_times_jaxtune_and_torch_in_separate_workers():
    """Each side in its own process (in one process each slowed the other by ~10%)."""
    tiny = ["--vocab", "256", "--hidden", "64", "--layers", "1", "--heads", "2", "--kv-heads", "2",
            "--intermediate", "128", "--batch", "2", "--seq", "32", "--steps", "1", "--rounds", "2"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), *tiny, "--precision", "bf16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\[bf16\] jaxtune [\d,]+ tokens/s .* torch [\d,]+ tokens/s .* ratio jaxtune/torch [\d.]+x "
                     r"\(per-round ratios: median [\d.]+x, range [\d.]+-[\d.]+x\)$", line)


def test_bench_without_torch_says_how_to_get_it(monkeypatch):
    """torch comes with the test extras only; without it the torch worker died with a traceback."""
    import importlib.util

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from bench import require_torch

    require_torch()  # installed here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(UserError, match=re.escape("PyTorch, which is not installed: install it with `bash "
                                                  "tools/install.sh --test` (a CPU build), or pass --jax-only.")):
        require_torch()


def test_bench_gives_the_median_and_range_of_its_per_round_ratios():
    """The best-of ratio alone hid how much a noisy machine moved it (0.98-1.19x in three runs)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from bench import paired_ratios

    # rounds of (jaxtune, torch) seconds: ratios 1.2, 0.9, 1.0
    assert paired_ratios([1.0, 2.0, 1.0], [1.2, 1.8, 1.0]) == "median 1.00x, range 0.90-1.20x"


def test_bench_knows_whether_the_cpu_has_bf16_matrix_instructions(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from bench import native_bf16_matmul

    cpuinfo = tmp_path / "cpuinfo"
    for flags, expected in [("fpu avx2 fma avx512f avx512_bf16", True), ("fpu avx2 amx_bf16 amx_tile", True),
                            ("fpu avx avx2 fma avx512f avx512bw", False)]:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert native_bf16_matmul(str(cpuinfo)) is expected
    cpuinfo.write_text("processor\t: 0\n")
    assert native_bf16_matmul(str(cpuinfo)) is None
    assert native_bf16_matmul(str(tmp_path / "missing")) is None


def test_bench_arguments_are_checked_in_one_line():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--batch", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--batch must be at least 1" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--kv-heads", "4", "--jax-only", "--precision", "fp32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: num_attention_heads (6) must be a multiple of num_key_value_heads (4).")


def _logger(tmp_path, **logging_overrides):
    from jaxtune.logging import RunLogger

    config = make_config({"workdir": str(tmp_path), **{f"logging.{k}": v for k, v in logging_overrides.items()}})
    return RunLogger(str(tmp_path), config, total_steps=10, history=[], enabled=True)


def test_an_eval_line_keeps_the_train_values_on_the_progress_bar(tmp_path):
    """tqdm's set_postfix replaces the whole postfix: with log_every == eval_every the bar
    showed eval_loss alone and never the loss."""
    log = _logger(tmp_path, progress_bar=True, tensorboard=False)
    log.start_progress(0)
    log.log({"step": 2, "loss": 2.5, "lr": 1e-5, "tokens_per_sec": 1234.0})
    log.log({"step": 2, "eval_loss": 2.7, "eval_ppl": 14.9})
    assert log.bar.postfix == "loss=2.5, lr=1e-05, tokens_per_sec=1234, eval_loss=2.7"
    log.log({"step": 4, "loss": 2.25, "lr": 2e-5, "tokens_per_sec": None})
    assert log.bar.postfix == "loss=2.25, lr=2e-05, tokens_per_sec=1234, eval_loss=2.7"
    log.close(plot=False)


def test_tensorboard_files_hold_each_record_soon_after_it_is_logged(tmp_path):
    """tensorboardX writes events from a queue and flushed its file every 120 s; the flush
    after each log line did not wait for the queue, so the file lagged a line behind and a
    killed run lost its last lines."""
    from jaxtune.logging import TENSORBOARD_FLUSH_SECS

    log = _logger(tmp_path, progress_bar=False, tensorboard=True)
    for step, loss in ((1, 2.5), (2, 2.25)):
        log.log({"step": step, "loss": loss})
        time.sleep(TENSORBOARD_FLUSH_SECS + 0.5)
        assert tensorboard_scalars(tmp_path, "loss") == [(s, l) for s, l in ((1, 2.5), (2, 2.25)) if s <= step]
    log.close(plot=False)


def _tensorboard_writers() -> int:
    """tensorboardX's event-writer threads alive in this process."""
    import threading

    return sum(t.is_alive() and type(t).__name__ == "_EventLoggerThread" for t in threading.enumerate())


def test_a_run_that_raises_leaves_no_tensorboard_thread_or_open_log(tiny, monkeypatch):
    """Only a stop or an anomaly stop closed the logger: any other exception (here from the
    evaluation) left TensorBoard's writer thread running and metrics.jsonl open, in the
    process of whoever called `run` (a notebook, a test)."""
    import jaxtune.logging
    import jaxtune.train

    opened = []
    logger_class = jaxtune.logging.RunLogger

    class Logger(logger_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    def failing_evaluate(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    before = _tensorboard_writers()
    monkeypatch.setattr(jaxtune.train, "RunLogger", Logger)
    monkeypatch.setattr(jaxtune.train, "evaluate", failing_evaluate)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run(make_config(tiny(train__max_steps=2, train__eval_every=2)))
    assert _tensorboard_writers() == before and len(opened) == 1 and opened[0].file.closed


def test_the_progress_bar_starts_when_training_does(tiny, monkeypatch, capsys):
    """Started with the logger, the bar's clock counted data preparation and compilation:
    its first rate and ETA were minutes off for a run of seconds."""
    import tqdm

    import jaxtune.train

    events = []
    compile_steps = jaxtune.train._Loop._compile_steps

    def timed_compile(self):
        compile_steps(self)
        events.append(("compiled", time.time()))

    class Bar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            events.append(("bar", self.start_t))

    monkeypatch.setattr(jaxtune.train._Loop, "_compile_steps", timed_compile)
    monkeypatch.setattr(tqdm, "tqdm", Bar)
    run(make_config(tiny(train__max_steps=2, train__eval_every=0, logging__progress_bar=True)))
    assert [name for name, _ in events] == ["compiled", "bar"]
    assert events[1][1] >= events[0][1]
    assert "2/2 [" in capsys.readouterr().err


def test_a_wandb_login_that_fails_is_found_before_the_data_and_before_overwrite_deletes(tiny, monkeypatch):
    """No API key on a headless host was found only when the logger started: after the data,
    the weights, and `train.overwrite` deleting the previous run's checkpoints."""
    import types

    import jaxtune.data

    run(make_config(tiny(train__max_steps=2, train__eval_every=0)))
    checkpoints = os.path.join(tiny()["workdir"], "checkpoints")
    assert os.listdir(checkpoints) == ["2"]
    fake = types.ModuleType("wandb")

    def login(**kw):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    fake.login = login
    monkeypatch.setitem(sys.modules, "wandb", fake)

    def no_data(*a, **kw):
        raise AssertionError("the data was prepared before W&B's login was checked")

    monkeypatch.setattr(jaxtune.data, "prepare_datasets", no_data)
    again = make_config(tiny(train__max_steps=2, train__eval_every=0, train__resume="never", train__overwrite=True,
                             logging__wandb=True))
    with pytest.raises(UserError, match=r"^logging.wandb=True but W&B did not start \(No API key configured"):
        run(again)
    assert os.listdir(checkpoints) == ["2"]  # the previous run is still there
    monkeypatch.setenv("WANDB_MODE", "offline")  # no login needed: not checked
    with pytest.raises(AssertionError, match="the data was prepared"):
        run(again)


def test_wandb_that_cannot_start_is_one_clear_error(tmp_path, monkeypatch):
    import types

    fake = types.ModuleType("wandb")
    fake.login = lambda **kw: True

    def init(**kw):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore detail")

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    before = _tensorboard_writers()
    with pytest.raises(UserError, match=r"^logging.wandb=True but W&B did not start \(api_key not configured "
                                        r"\(no-tty\)\. call wandb.login\(key=\[your_api_key\]\)\); run `wandb login`"):
        _logger(tmp_path, wandb=True, tensorboard=True, progress_bar=False)
    assert _tensorboard_writers() == before  # TensorBoard's writer thread was left running


def test_install_script_refuses_what_it_cannot_use(tmp_path):
    """`--tests` (a typo) ran a plain install; a .venv without pip (a first run on Debian
    without python3-venv) was reused, failing forever; an old Python went unnoticed."""
    shutil.copytree(os.path.join(ROOT, "tools"), tmp_path / "tools")
    for args in (["--tests"], ["--test", "junk"]):
        typo = subprocess.run(["bash", "tools/install.sh", *args], cwd=tmp_path, capture_output=True, text=True)
        assert typo.returncode == 2 and typo.stderr.strip() == "usage: bash tools/install.sh [--test]"
    old = tmp_path / "old_python"
    old.write_text('#!/bin/sh\n[ "$1" = "-V" ] && echo "Python 3.8.10"\nexit 1\n')  # fails any version check
    os.chmod(old, 0o755)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(old, tmp_path / ".venv" / "bin" / "python")  # a .venv whose python has no pip
    out = subprocess.run(["bash", "tools/install.sh"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(old)})
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "tools/install.sh: .venv has no pip or a Python older than 3.10; making it again",
        f"error: jaxtune needs Python 3.10 or newer; {old} is Python 3.8.10. Set PYTHON=/path/to/python3.10+."]
    assert not (tmp_path / ".venv").exists()


def test_bench_compile_measures_the_precision_asked_for_and_refuses_flags_it_ignores():
    """--compile measured float32 whatever --precision said, and took --layers/--steps without use."""
    bench = [sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--compile", "--vocab", "256", "--hidden", "64",
             "--heads", "2", "--kv-heads", "2", "--intermediate", "128", "--batch", "2", "--seq", "32"]
    proc = subprocess.run([*bench, "--precision", "bf16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "layers=2 and 16" in lines[0]
    assert [re.sub(r"[\d.]+", "N", line) for line in lines[1:]] == [
        "[bfN] compile, N layers: N s", "[bfN] compile, N layers: N s", "[bfN] ratio N/N layers: Nx"]
    refused = subprocess.run([*bench, "--layers", "4", "--steps", "3"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].endswith(
        "error: --compile measures 2 and 16 layers and times no step: --layers, --steps would change nothing.")

"""Configuration: defaults, command-line overrides and validation, before any work.

A recipe in `configs/` is a Python file whose `get_config()` starts from `defaults()` and
changes what it needs. The config is locked: a key that does not exist is an error, and
ml_collections checks the type of every assignment. `validate` then checks values and
contradictions, so a bad config fails in a second, not after loading a model.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
import re
import traceback
from typing import Callable, Sequence

import ml_collections
from ml_collections import config_dict

from jaxtune.errors import UserError

SCHEDULES = ("linear", "cosine", "constant")
EVAL_METRICS = ("eval_loss", "eval_ppl", "eval_accuracy")
DTYPES = ("float32", "bfloat16", "float16")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"

    c.model = ml_collections.ConfigDict()
    c.model.hf_path = ""  # a local Hugging Face Llama directory
    c.model.param_dtype = "float32"  # master weights and optimizer state
    c.model.compute_dtype = "bfloat16"  # matmul inputs (accumulation is float32)
    c.model.remat = "dots"  # none | full | dots | dots_no_batch
    # >0: lm head + loss over this many positions at a time, skipping chunks that train nothing
    c.model.loss_chunk_len = 0
    c.model.allow_pickle = False  # allow pytorch_model.bin (pickle runs code)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all remaining devices
    c.mesh.tensor = 1

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ()
    c.data.eval_files = ()
    c.data.format = "auto"  # auto | text | prompt_completion | alpaca | sharegpt | messages
    c.data.tokenizer_path = ""  # default: model.hf_path
    c.data.max_seq_len = 1024
    c.data.packing = True
    c.data.truncation = "truncate"  # truncate | drop
    c.data.train_on_prompt = False
    c.data.on_bad_record = "error"  # error | skip
    c.data.eval_fraction = 0.05  # held out of train when no eval_files are given
    c.data.cache_dir = ""  # default: <workdir>/data_cache

    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 8  # sequences (rows) per optimizer step
    c.train.grad_accum_steps = 1
    c.train.num_epochs = 1.0
    c.train.max_steps = -1  # >0 overrides num_epochs
    c.train.seed = 0
    c.train.log_every = 10
    c.train.eval_every = 100  # 0: evaluate only at the end
    c.train.eval_batch_size = 0  # rows per eval batch; 0: global_batch_size / grad_accum_steps
    c.train.save_every = 500
    c.train.resume = "auto"  # auto | never
    c.train.overwrite = False
    c.train.load_best_at_end = False

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 2e-5
    c.optimizer.schedule = "linear"  # linear | cosine | constant
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.warmup_steps = 0  # >0 overrides warmup_ratio
    c.optimizer.min_lr_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.max_grad_norm = 1.0  # 0: no clipping

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 2
    c.checkpoint.keep_best = 1
    c.checkpoint.metric = "eval_loss"
    c.checkpoint.greater_is_better = config_dict.placeholder(bool)  # None: inferred from the name
    c.checkpoint.on_corrupt = "error"  # error | fallback

    c.early_stopping = ml_collections.ConfigDict()
    c.early_stopping.patience = 0  # evaluations without improvement; 0: off
    c.early_stopping.min_delta = 0.0

    c.anomaly = ml_collections.ConfigDict()
    c.anomaly.spike_factor = 0.0  # skip a step whose loss > factor x running median; 0: off
    c.anomaly.window = 32  # steps in the running median
    c.anomaly.max_consecutive = 5
    c.anomaly.on_persistent = "rollback"  # rollback | stop

    c.logging = ml_collections.ConfigDict()
    c.logging.progress_bar = True
    c.logging.tensorboard = True
    c.logging.wandb = False
    c.logging.wandb_project = "jaxtune"
    c.logging.peak_flops = 0.0  # per device, for MFU; 0: from the device kind (see README)
    c.logging.plot = True  # curves.png at the end
    c.lock()  # a recipe that assigns a misspelt key fails instead of being ignored
    return c


# ---- Loading -------------------------------------------------------------------------------
def load_recipe(path: str) -> ml_collections.ConfigDict:
    if os.path.isdir(path):
        raise UserError(f"config file {path} is a directory; name a recipe in it (e.g. {path.rstrip('/')}/demo.py).")
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location("jaxtune_recipe", path)
    if spec is None or not path.endswith(".py"):
        raise UserError(f"config file {path} is not a Python recipe (a .py file with get_config()).")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"config file {path}:{e.lineno}: syntax error ({e.msg}).") from None
    except Exception as e:  # noqa: BLE001 - the recipe's own code failed (a NameError, an import)
        raise UserError(f"config file {path} failed to load: {type(e).__name__}: {e}.") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} has no get_config() function.")
    try:
        config = module.get_config()
    except AttributeError as e:  # assigning a key that does not exist in the locked defaults
        raise UserError(f"config file {_recipe_line(path, e)}: {_unknown_key_message(e)}") from None
    except TypeError as e:  # ml_collections refuses a value of the wrong type
        raise UserError(f"config file {_recipe_line(path, e)}: {_wrong_type_message(e)}") from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the recipe's own code failed (a NameError, a bad file read)
        raise UserError(f"config file {path}: get_config() failed: {type(e).__name__}: {e}.") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"config file {path}: get_config() must return an ml_collections.ConfigDict.")
    return config


def _recipe_line(path: str, error: BaseException) -> str:
    """`path:line` of the recipe's line that raised: ml_collections names only the last key
    (`lr`, not `optimizer.lr`), which the line makes plain."""
    lines = [lineno for frame, lineno in traceback.walk_tb(error.__traceback__) if frame.f_code.co_filename == path]
    return f"{path}:{lines[-1]}" if lines else path


def _wrong_type_message(error: TypeError) -> str:
    """ml_collections' "Could not override field 'x' (reference). V is of original type <class 'str'>
    and cannot be casted to type <class 'tuple'>", said plainly; a lone string for a list is
    usually a one-item tuple without its comma."""
    text = str(error)
    m = re.search(r"field '([^']+)'.*?\. (.*) is of original type <class '([\w.]+)'> and cannot be casted to "
                  r"type <class '([\w.]+)'>", text, re.S)
    if m is None:
        return text
    field, value, got, want = m.groups()
    shown = repr(value) if got == "str" else value  # the message holds str(value): quote only strings
    message = f"{field} must be of type {want}, got the {got} {shown}"
    if want in ("tuple", "list") and got == "str":
        message += f' (one item is ("{value}",), with the comma)'
    return message + "."


def _unknown_key_message(error: AttributeError) -> str:
    """ml_collections' message lists every field of the section; keep the key and its hint."""
    text = str(error).strip("'\"")
    key = re.search(r'Key "([^"]+)" does not exist', text)
    if key is None:
        return text
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return f"unknown key {key.group(1)!r}" + (f" (did you mean {hint.group(1)!r}?)" if hint else "") + "."


def _parse_value(key: str, text: str, declared: type):
    if declared is bool:
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise UserError(f"--config.{key} expects true or false, got {text!r}.")
    if issubclass(declared, (tuple, list)):
        if text.strip().startswith(("[", "(")):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise UserError(f"--config.{key}: cannot parse {text!r} as a list.") from None
            # ("a.jsonl") is a string in parentheses, (5) a number: one item, which the type check judges
            return tuple(value) if isinstance(value, (list, tuple)) else (value,)
        return tuple(p for p in (s.strip() for s in text.split(",")) if p)
    if declared is str:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(value, bool) and declared in (int, float):  # ml_collections would take True as 1
        raise UserError(f"--config.{key} expects a value of type {declared.__name__}, got {text!r}.")
    if declared is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            where = ".".join(parts[:i]) or "config"
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f"did you mean {'.'.join([*parts[:i], close[0], *parts[i + 1:]])!r}? " if close else ""
            raise UserError(f"unknown config key {key!r}: {where} has no {part!r} ({hint}it has: {', '.join(keys)}).")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise UserError(f"--config.{key} is a section; set one of its keys instead.")
    # A placeholder (None until set) declares its type on its reference.
    declared = node.get_ref(parts[-1]).get_type() if current is None else type(current)
    default_node, _ = _section(defaults(), key)
    if default_node[parts[-1]] is None and text.strip().lower() in ("none", "null"):
        value = None  # back to "unset", as a recipe may have set it
    else:
        value = _parse_value(key, text, declared)
    try:
        node[parts[-1]] = value
    except TypeError:
        raise UserError(f"--config.{key} expects a value of type {declared.__name__}, got {text!r}.") from None


def parse_args(argv: Sequence[str], default_config: str) -> ml_collections.ConfigDict:
    """`--config PATH` and `--config.a.b=VALUE` (or `--config.a.b VALUE`)."""
    recipe = default_config
    overrides: list[tuple[str, str]] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            print(_usage())
            raise SystemExit(0)
        if not arg.startswith("--config"):
            raise UserError(f"unexpected argument {arg!r}; use --config PATH and --config.KEY=VALUE.")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--config"):  # not the next option as its value
                raise UserError(f"--{name} needs a value.")
            value = args[i + 1]
            i += 1
        if name == "config":
            recipe = value
        elif name.startswith("config."):
            overrides.append((name[len("config."):], value))
        else:
            raise UserError(f"unexpected argument {arg!r}; use --config PATH and --config.KEY=VALUE.")
        i += 1
    config = load_recipe(recipe)
    for key, value in overrides:
        apply_override(config, key, value)
    expand_user_paths(config)
    validate(config)
    return config


def _usage() -> str:
    return (
        "usage: python run.py [--config configs/NAME.py] [--config.KEY=VALUE ...]\n"
        "Without --config it runs configs/demo.py. Keys: see README.md (Configuration)."
    )


# ---- Validation ------------------------------------------------------------------------------
def _choice(value, options, key):
    if value not in options:
        raise UserError(f"{key} must be one of {', '.join(map(str, options))}, got {value!r}.")


def metric_greater_is_better(config) -> bool:
    """As the Hugging Face Trainer: unset means lower is better for losses (and perplexity)."""
    if config.checkpoint.greater_is_better is not None:
        return bool(config.checkpoint.greater_is_better)
    return not config.checkpoint.metric.endswith(("loss", "ppl"))


def has_eval_data(config) -> bool:
    return bool(config.data.eval_files) or config.data.eval_fraction > 0


# Keys read only when there is evaluation data (train.load_best_at_end and
# early_stopping.patience are refused without it, in `validate`).
EVAL_ONLY_KEYS = ("train.eval_every", "train.eval_batch_size", "checkpoint.metric",
                  "checkpoint.greater_is_better", "checkpoint.keep_best")


def settings_without_effect(config) -> list[str]:
    """One sentence per reason that makes settings changed from their defaults unread, e.g.
    "there is no evaluation data (...), so these settings change nothing: k=v, ...".

    A run warns rather than refuses: a recipe sets these, and turning a feature off on the
    command line (`data.eval_fraction=0`, `train.max_steps=5` for a smoke test) should not
    mean undoing each of them."""
    t, o = config.train, config.optimizer
    reasons = (
        (not has_eval_data(config),
         "there is no evaluation data (data.eval_files is empty and data.eval_fraction=0)", EVAL_ONLY_KEYS),
        (t.max_steps > 0, f"train.max_steps={t.max_steps} sets the run's length", ("train.num_epochs",)),
        (o.warmup_steps > 0, f"optimizer.warmup_steps={o.warmup_steps} sets the warmup", ("optimizer.warmup_ratio",)),
        (not config.logging.wandb, "logging.wandb=False", ("logging.wandb_project",)),
        (bool(config.data.eval_files) and config.data.eval_fraction > 0,
         "data.eval_files is set (a held-out fraction is used only without eval files)", ("data.eval_fraction",)),
        (config.anomaly.spike_factor == 0, "anomaly.spike_factor=0 (no spike test)", ("anomaly.window",)),
    )
    reference = defaults()
    sentences = []
    for applies, reason, keys in reasons:
        if not applies:
            continue
        changed = []
        for key in keys:
            node, last = _section(config, key)
            default_node, _ = _section(reference, key)
            if node[last] != default_node[last]:
                changed.append(f"{key}={node[last]}")
        if changed:
            sentences.append(f"{reason}, so {'this setting changes' if len(changed) == 1 else 'these settings change'} "
                             f"nothing: {', '.join(changed)}.")
    return sentences


def _kind(default) -> tuple[str, Callable[[object], bool]]:
    """What a key whose default is `default` accepts, in words, and the test for it."""
    if isinstance(default, bool):
        return "true or false", lambda v: isinstance(v, bool)
    if isinstance(default, int):
        return "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(default, float):
        return "a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if isinstance(default, str):
        return "a string", lambda v: isinstance(v, str)
    if isinstance(default, tuple):
        return "a list of paths (strings)", lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v)
    raise TypeError(f"no type rule for default {default!r}")


def _check_types(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Every key holds a value of its default's type. ml_collections lets None through for any
    field, and does not look inside tuples, so a recipe could otherwise pass a None or a Path
    that fails much later with a traceback. A key the defaults do not have is refused here
    too: a recipe that unlocks its config (or builds a new ConfigDict) could add a misspelt
    key that nothing reads."""
    unknown = sorted(set(config.keys()) - set(reference.keys()))
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(reference.keys()), n=1)
        raise UserError(f"unknown key {prefix + unknown[0]!r}"
                        + (f" (did you mean {prefix + near[0]!r}?)" if near else "") + ".")
    for key, default in reference.items():
        name = prefix + key
        if key not in config:
            raise UserError(f"config key {name} is missing (a recipe replaced its section?).")
        value = config[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise UserError(f"config key {name} must be a section, got {value!r}.")
            _check_types(value, default, name + ".")
        elif default is not None:  # placeholders (None by default) are typed by ml_collections
            words, ok = _kind(default)
            if not ok(value):
                raise UserError(f"{name} must be {words}, got {value!r}.")


PATH_KEYS = ("workdir", "model.hf_path", "data.tokenizer_path", "data.cache_dir")
PATH_LIST_KEYS = ("data.train_files", "data.eval_files")
MAX_STEPS = 2**31  # the step counters and the schedule's count are int32
MAX_ANOMALY_WINDOW = 10_000


def _section(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """("a.b.c") -> (config.a.b, "c") for a key known to exist."""
    *parents, last = key.split(".")
    for part in parents:
        config = config[part]
    return config, last


def expand_user_paths(config: ml_collections.ConfigDict) -> None:
    """`~` in the path keys and the data file lists, so that config.json records the paths
    that were read and written."""
    _check_types(config, defaults())  # a recipe that dropped a section: one line, not a KeyError here
    for key in PATH_KEYS:
        node, last = _section(config, key)
        if node[last].startswith("~"):
            node[last] = os.path.expanduser(node[last])
    for key in PATH_LIST_KEYS:
        node, last = _section(config, key)
        node[last] = tuple(os.path.expanduser(p) for p in node[last])


def _refuse_urls(config: ml_collections.ConfigDict) -> None:
    """Paths are opened with the local file system: `gs://b/run` would become a local
    directory named `gs:` on every host. Buckets work mounted (gcsfuse, s3fs)."""
    for key in (*PATH_KEYS, *PATH_LIST_KEYS):
        node, last = _section(config, key)
        values = node[last] if isinstance(node[last], (tuple, list)) else (node[last],)
        for value in values:
            if isinstance(value, str) and "://" in value:
                raise UserError(
                    f"{key} {value} is a URL; jaxtune reads and writes local paths only: mount the bucket "
                    "(e.g. gcsfuse, s3fs) and give its mounted path."
                )


def validate(config: ml_collections.ConfigDict) -> None:
    """Values and contradictions that need no devices or files."""
    _check_types(config, defaults())
    _refuse_urls(config)
    m, d, t, o = config.model, config.data, config.train, config.optimizer
    if not config.workdir:
        raise UserError("workdir must be set.")
    if os.path.exists(config.workdir) and not os.path.isdir(config.workdir):
        raise UserError(f"workdir {config.workdir} exists and is not a directory.")
    if not m.hf_path:
        raise UserError("model.hf_path must name a local Hugging Face Llama directory.")
    _choice(m.param_dtype, DTYPES, "model.param_dtype")
    if m.param_dtype == "float16":  # Adam's state lives in the parameter dtype
        raise UserError(
            "model.param_dtype=float16 cannot hold Adam's state (eps 1e-8 rounds to 0 and squared gradients "
            "underflow, so the first update is inf/NaN); use float32 (or bfloat16) parameters with "
            "model.compute_dtype=float16."
        )
    _choice(m.compute_dtype, DTYPES, "model.compute_dtype")
    _choice(m.remat, ("none", "full", "dots", "dots_no_batch"), "model.remat")
    if m.loss_chunk_len < 0 or (m.loss_chunk_len and d.max_seq_len % m.loss_chunk_len):
        raise UserError(
            f"model.loss_chunk_len ({m.loss_chunk_len}) must be 0 or divide data.max_seq_len ({d.max_seq_len})."
        )
    if not d.train_files:
        raise UserError("data.train_files must list at least one file, glob or directory.")
    _choice(d.format, ("auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages"), "data.format")
    _choice(d.truncation, ("truncate", "drop"), "data.truncation")
    _choice(d.on_bad_record, ("error", "skip"), "data.on_bad_record")
    if d.max_seq_len < 2:
        raise UserError(f"data.max_seq_len must be at least 2, got {d.max_seq_len}.")
    if d.max_seq_len >= 2**31:
        raise UserError(f"data.max_seq_len must be below 2**31 (positions are int32), got {d.max_seq_len}.")
    if not 0 <= d.eval_fraction < 1:
        raise UserError(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}.")

    if t.global_batch_size < 1 or t.grad_accum_steps < 1:
        raise UserError("train.global_batch_size and train.grad_accum_steps must be positive.")
    if t.global_batch_size % t.grad_accum_steps:
        raise UserError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.grad_accum_steps ({t.grad_accum_steps})."
        )
    if t.max_steps == 0 or t.max_steps < -1:
        raise UserError("train.max_steps must be positive, or -1 to train for train.num_epochs.")
    if t.max_steps >= MAX_STEPS:
        raise UserError(f"train.max_steps must be below 2**31 (the step counters are int32), got {t.max_steps}.")
    if t.num_epochs <= 0:  # also when train.max_steps overrides it: a negative count is a mistake
        raise UserError(f"train.num_epochs must be positive, got {t.num_epochs}.")
    if t.log_every < 1:
        raise UserError("train.log_every must be at least 1.")
    if t.eval_every < 0 or t.save_every < 1:
        raise UserError("train.eval_every must be >= 0 and train.save_every >= 1.")
    if t.eval_batch_size < 0:
        raise UserError("train.eval_batch_size must be >= 0.")
    _choice(t.resume, ("auto", "never"), "train.resume")
    if t.overwrite and t.resume != "never":
        raise UserError("train.overwrite=True only applies with train.resume=never (it deletes a previous run's "
                        "outputs); with train.resume=auto a run continues from them.")

    if o.lr <= 0:
        raise UserError(f"optimizer.lr must be positive, got {o.lr}.")
    _choice(o.schedule, SCHEDULES, "optimizer.schedule")
    if not 0 <= o.warmup_ratio < 1:
        raise UserError(f"optimizer.warmup_ratio must be in [0, 1), got {o.warmup_ratio}.")
    if o.warmup_steps < 0:
        raise UserError("optimizer.warmup_steps must be >= 0.")
    if not 0 <= o.min_lr_ratio <= 1:
        raise UserError(f"optimizer.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}.")
    if o.schedule == "constant" and o.min_lr_ratio:
        raise UserError("optimizer.min_lr_ratio has no effect with optimizer.schedule=constant; set it to 0 "
                        "or choose linear or cosine.")
    if o.weight_decay < 0 or o.max_grad_norm < 0 or o.eps <= 0:
        raise UserError("optimizer.weight_decay and max_grad_norm must be >= 0, eps > 0.")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        raise UserError("optimizer.b1 and optimizer.b2 must be in [0, 1).")

    ck, es = config.checkpoint, config.early_stopping
    _choice(ck.metric, EVAL_METRICS, "checkpoint.metric")
    _choice(ck.on_corrupt, ("error", "fallback"), "checkpoint.on_corrupt")
    if ck.keep < 1 or ck.keep_best < 1:
        raise UserError("checkpoint.keep and checkpoint.keep_best must be at least 1.")
    if es.patience < 0 or es.min_delta < 0:
        raise UserError("early_stopping.patience and min_delta must be >= 0.")
    if es.min_delta and not es.patience:
        raise UserError("early_stopping.min_delta has no effect without early_stopping.patience > 0 (it only "
                        "decides which evaluations count as improvements for early stopping).")
    needs_eval = [
        name for name, on in (
            ("train.load_best_at_end", t.load_best_at_end), ("early_stopping.patience", es.patience > 0),
        ) if on
    ]
    if needs_eval and not has_eval_data(config):
        raise UserError(f"{needs_eval[0]} needs evaluation data: set data.eval_files or data.eval_fraction > 0.")
    if es.patience > 0 and t.eval_every == 0:
        raise UserError("early_stopping.patience needs periodic evaluation: set train.eval_every > 0.")

    a = config.anomaly
    if a.spike_factor < 0 or (0 < a.spike_factor <= 1):
        raise UserError(f"anomaly.spike_factor must be 0 (off) or greater than 1, got {a.spike_factor}.")
    if a.window < 1 or a.max_consecutive < 1:
        raise UserError("anomaly.window and anomaly.max_consecutive must be at least 1.")
    if a.window > MAX_ANOMALY_WINDOW:  # a sorted copy of the window every step, on every device
        raise UserError(f"anomaly.window must be at most {MAX_ANOMALY_WINDOW:,} steps (the guard compares a loss with "
                        f"the median of recent ones), got {a.window:,}.")
    _choice(a.on_persistent, ("rollback", "stop"), "anomaly.on_persistent")
    if config.logging.peak_flops < 0:
        raise UserError("logging.peak_flops must be >= 0.")


def to_dict(config: ml_collections.ConfigDict) -> dict:
    return config.to_dict()

"""What a resumed run must keep as it was: every recipe key that changes what the run computes.

The model and conversion, the data, the averaged weights switched on or off and the schedule each
have their own refusal (a cosine schedule restarting upwards, best.pt chosen on two different
splits); every other key that changes the result (the optimizer, the batch, the losses' smoothing,
clipping, mixup, precision, the seed) is refused in one line listing each change with its old and
new value. Keys that change how the run goes but not what it computes (``FREE``: workers, where the
data lies, logging, TensorBoard, threads, the device and its schedules, the output folder) may
change; ``check_resume`` returns them for the log. A resumed run is the recorded run or a refusal.
"""

from __future__ import annotations

import yaml

from ..errors import AugLocalError
from .config import TrainRecipe

__all__ = ["check_resume", "FREE"]

# how a run goes, not what it computes: these may differ on resume (test_limit: which test images
# the final evaluation uses; eval_batch_size: evaluation runs in eval mode, batch by batch)
FREE = frozenset({"data.num_workers", "data.root", "data.download", "data.test_limit", "eval_batch_size", "threads", "host_memory",
                  "tensorboard", "log_interval", "keep_checkpoints", "output", "device", "channels_last", "cuda_graphs", "offload",
                  "overlap", "optimizer.per_unit", "parallel.pipeline"})
# optimizer.per_unit: the same updates either way; parallel.pipeline: the strategy refuses another layout itself


def check_resume(saved: dict, recipe: TrainRecipe, path) -> list[str]:
    """Refuse in one line to resume ``recipe`` from checkpoint ``path`` (trained with recipe dict
    ``saved``) where it would compute another run; returns the ``FREE`` keys that changed, as
    ``key: old -> new``, for the log."""
    now = recipe.to_dict()
    for section in ("model", "conversion"):
        for key, value in now[section].items():
            if (section, key) == ("conversion", "aux_init"):  # only the start of a run: resuming loads the weights
                continue
            if key in saved.get(section, {}) and saved[section][key] != value:  # keys added since: defaults
                raise AugLocalError(f"cannot resume from {path}: it was trained with {section}.{key} = "
                                    f"{saved.get(section, {}).get(key)!r}, this recipe says {value!r}; use that recipe or "
                                    "a new output folder")
    # the data a run trains and chooses on: another split would change the run and mix test and
    # validation accuracies in its history (runs from before data.val_split held none out)
    for key, value in now["data"].items():
        if key in ("num_workers", "root", "download", "test_limit"):  # where and how fast, not what
            continue
        before = saved.get("data", {}).get(key, 0 if key == "val_split" else value)
        if before != value:
            raise AugLocalError(f"cannot resume from {path}: it was trained with data.{key} = {before!r}, this "
                                f"recipe says {value!r}; resume with --set data.{key}={_yaml_value(before)}, or "
                                "start a new run")
    # the averaged weights are what a run evaluates and keeps: switching them on or off mid-run
    # would evaluate another model than the one the run chose its best epoch on
    if saved.get("ema_decay") != now["ema_decay"]:
        raise AugLocalError(f"cannot resume from {path}: it was trained with ema_decay = {saved.get('ema_decay')!r}, "
                            f"this recipe says {now['ema_decay']!r}; keep it, or start a new run from its weights "
                            f"(--set model.checkpoint={path})")
    # a schedule is defined for the run's length: resuming under another one would jump the learning
    # rate (a finished cosine restarting upwards); a longer run starts anew from the weights
    longer = saved.get("epochs") not in (None, now["epochs"]) and now["schedule"]["name"] != "constant"
    changed = [k for k, v in now["schedule"].items() if k in saved.get("schedule", {}) and saved["schedule"][k] != v]
    if longer or changed:
        what = (f"epochs = {saved['epochs']}" if longer else f"schedule.{changed[0]} = {saved['schedule'][changed[0]]!r}")
        raise AugLocalError(f"cannot resume from {path}: its {saved['schedule']['name']} schedule was made for "
                            f"{what}, and this recipe changes it (the learning rate would jump); keep it, or train "
                            f"on from its weights under the new schedule in a new run: --set model.checkpoint={path} "
                            "--set output=<a new folder>")
    # every other key: what the run computes, or how it goes
    before, after = _flat(saved), _flat(now)
    checked = ("model.", "conversion.", "data.", "schedule.", "epochs", "ema_decay")
    changed = [(k, before[k], v) for k, v in after.items() if k in before and before[k] != v]
    result = [c for c in changed if c[0] not in FREE and not c[0].startswith(checked)]
    if result:
        what = ", ".join(f"{k} {_yaml_value(old)} -> {_yaml_value(new)}" for k, old, new in result)
        raise AugLocalError(f"cannot resume from {path}: this recipe changes what the run computes ({what}); resume "
                            "with the values it was trained with, or train on from its weights in a new run: --set "
                            f"model.checkpoint={path} --set output=<a new folder>")
    return [f"{k}: {_yaml_value(old)} -> {_yaml_value(new)}" for k, old, new in changed if k in FREE]


def _flat(d: dict, lead: str = "") -> dict:
    """A recipe dict's values by dotted key (``optimizer.lr``); lists stay values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("kwargs",):
            out.update(_flat(v, f"{lead}{k}."))
        else:
            out[f"{lead}{k}"] = v
    return out


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()

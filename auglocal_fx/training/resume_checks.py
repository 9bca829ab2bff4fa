"""What a resumed run must keep as it was: the model and conversion, the data, the averaged weights
switched on or off, and the schedule. Anything else would continue another run than the one the
checkpoint holds (a cosine schedule restarting upwards, best.pt chosen on two different splits);
each is refused in one line with the way on.
"""

from __future__ import annotations

import yaml

from ..errors import AugLocalError
from .config import TrainRecipe

__all__ = ["check_resume"]


def check_resume(saved: dict, recipe: TrainRecipe, path) -> None:
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


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()

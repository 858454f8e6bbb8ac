"""Per-architecture training recipes (``model.recipe``), read from ``recipes.yaml``.

A recipe maps architectures (registry names; ``"*"`` for any other) to config settings, e.g.
``{training: {lr: 0.01, ema: 0.999}, privacy: {clipping: automatic}}``, so that each
architecture is compared at its own tuned settings rather than one shared, untuned setting.
An architecture's optional ``non_private:`` entry (same sections) is merged over its settings
in a run with ``privacy.enabled: false``: the non-private arm of a study is tuned for itself
(without noise, a decaying schedule and a larger step count help; under DP they may not).
Applied to the config mapping before it is validated (:func:`privseg.config.parse_config`):
the resolved values are in the config, so the run id covers them, and a recipe file edited
later gives new run ids rather than mislabelled old ones.

Each recipe also says how it was tuned and whether the tuning's privacy cost is accounted
(Papernot & Steinke 2022, arXiv 2110.03620: choosing among DP runs on private data costs
privacy too); a run that uses a recipe repeats that statement in its record.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import yaml

RECIPES_FILE = "recipes.yaml"
#: the config sections a recipe may set
RECIPE_SECTIONS = ("training", "privacy")
#: an architecture's settings for non-private runs, merged over its (DP) settings
NON_PRIVATE_KEY = "non_private"


@cache
def load_recipes() -> dict[str, dict]:
    """The shipped recipes by name (``privseg/recipes.yaml``); top-level keys starting with
    ``_`` hold shared YAML anchors, not recipes."""
    text = (resources.files("privseg") / RECIPES_FILE).read_text()
    return {k: v for k, v in (yaml.safe_load(text) or {}).items() if not k.startswith("_")}


def recipe_settings(recipe: str, model: str, private: bool = True) -> dict[str, dict]:
    """The settings recipe ``recipe`` gives architecture ``model`` (in a non-private run:
    with its ``non_private`` entry merged over them); a KeyError names what is missing and
    what exists."""
    recipes = load_recipes()
    if recipe not in recipes:
        raise KeyError(f"model.recipe: no recipe {recipe!r} in {RECIPES_FILE}; recipes: "
                       f"{', '.join(sorted(recipes))}")
    archs = recipes[recipe].get("architectures", {})
    settings = archs.get(model, archs.get("*"))
    if settings is None:
        raise KeyError(f"model.recipe: recipe {recipe!r} ({RECIPES_FILE}) has no settings for "
                       f"model {model!r} and no '*' entry; it has: {', '.join(sorted(archs))}")
    settings = json.loads(json.dumps(settings))  # a copy: YAML anchors share their objects
    override = settings.pop(NON_PRIVATE_KEY, None) or {}
    for where, part in ((model, settings), (f"{model}.{NON_PRIVATE_KEY}", override)):
        bad = sorted(set(part) - set(RECIPE_SECTIONS))
        if bad:
            raise KeyError(f"model.recipe: recipe {recipe!r} ({RECIPES_FILE}), model {where!r}:"
                           f" sections {bad} not allowed; a recipe sets {RECIPE_SECTIONS}")
    if private:
        return settings
    return {section: {**settings.get(section, {}), **override.get(section, {})}
            for section in RECIPE_SECTIONS if section in settings or section in override}


def apply_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its model's recipe settings merged over it (unchanged without
    ``model.recipe``)."""
    model = data.get("model") if isinstance(data, dict) else None
    recipe = model.get("recipe") if isinstance(model, dict) else None
    if recipe is None:
        return data
    data = json.loads(json.dumps(data))
    private = bool((data.get("privacy") or {}).get("enabled", True))
    for section, values in recipe_settings(str(recipe), model.get("name", "unet"),
                                           private).items():
        node = data.setdefault(section, {})
        node.update(values)
    return data


def recipe_statement(recipe: str | None) -> dict | None:
    """What a run record says about its recipe: name, how it was tuned, privacy cost."""
    if recipe is None:
        return None
    entry = load_recipes()[recipe]
    tuning = entry.get("tuning", {})
    return {"name": recipe, "description": entry.get("description"),
            "tuning_method": tuning.get("method"), "tuning_sweep": tuning.get("sweep"),
            "tuning_privacy_cost": tuning.get("privacy_cost", "not covered")}

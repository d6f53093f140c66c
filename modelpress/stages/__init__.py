"""One file per technique: a frozen config dataclass (fields = recipe YAML keys) with
apply(model, calib) -> stats. The only registry is modelpress.recipe.STAGES."""

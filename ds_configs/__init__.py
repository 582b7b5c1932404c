"""DeepSpeed configs, installed as `mmpeft.ds_configs` so a config's `ds_configs/NAME.json`
resolves without a clone."""

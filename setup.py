"""The package list: every `mmpeft*` package, plus the folders users run from a clone
(`recipes/`, `data_gen/`, `ds_configs/`) installed inside `mmpeft`, so that a plain
`pip install .` runs `python -m mmpeft.recipes.llava_finetune` with its shipped configs."""

from setuptools import find_packages, setup

BESIDE = {"mmpeft.recipes": "recipes", "mmpeft.data_gen": "data_gen", "mmpeft.ds_configs": "ds_configs"}

setup(
    packages=[*find_packages(include=["mmpeft", "mmpeft.*"]), *BESIDE],
    package_dir=BESIDE,
    package_data={"mmpeft.recipes": ["configs/*.yaml"], "mmpeft.data_gen": ["prompts/*"],
                  "mmpeft.ds_configs": ["*.json"]},
)

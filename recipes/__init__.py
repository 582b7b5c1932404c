"""The recipes, installed as `mmpeft.recipes`: `python -m mmpeft.recipes.NAME` runs one."""

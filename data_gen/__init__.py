"""data_gen's scripts and prompts, installed as `mmpeft.data_gen`."""

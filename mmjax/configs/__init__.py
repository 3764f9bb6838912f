"""Experiment configs: one python file per experiment, each with `get_config(arg) -> ConfigDict`."""

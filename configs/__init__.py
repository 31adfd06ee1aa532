"""The Hydra config tree, shipped inside the installed package as `mehldau.configs`."""

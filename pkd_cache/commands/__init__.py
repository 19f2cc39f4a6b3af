"""The commands: dump, distill, sweep, finetune, eval, serve, bench-student. Each is a function over a typed config
(pkd_cache/config.py) that the CLI and the Python API both call; nothing below this layer imports it."""

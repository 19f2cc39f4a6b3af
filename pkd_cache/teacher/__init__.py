"""The teacher at work: run it over a chunk of examples for its logits and every layer's [CLS] vector (run.py).
Loading it (a hub name, an alias or a folder) is pkd_cache/models.py; fine-tuning it is the finetune command."""

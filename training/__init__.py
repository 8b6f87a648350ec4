"""The thin training stage, apart from curation (open_clip's library vs trainer split): train
open_clip models on curated shards at equal steps, evaluate them, and run the policy ablation."""

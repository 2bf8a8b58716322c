"""Group-conditioned CLIP reward model (PerFusion-style): impressions, model, training, evaluation.

Imports the ``genshop`` core only; nothing in the core imports it.

| module | job |
| --- | --- |
| ``groups`` | customer groups as a model may see them (``configs/groups.yaml``, section ``groups:``) |
| ``impressions`` | the impressions format (Parquet v1, JSONL on import) and all-or-nothing validated import |
| ``splits`` | held-out items: a stable hash split of item ids |
| ``simulator`` | hidden group utilities (section ``simulator:``), MNL choices, the Bayes-optimal ceiling |
| ``features`` | CLIP embeddings of items and briefs through ``genshop.embedding``, cached per embedder fingerprint |
| ``model`` | ``RewardModel``: image + brief + group → reward (DCN-v2 cross network), ``save/from_pretrained`` |
| ``losses`` | listwise softmax, pairwise Bradley–Terry, mixed; no-choice impressions |
| ``data`` | impressions → index tensors over embedding matrices; batched prediction |
| ``training`` | ``train_reward(config, progress)``: accelerate, early stopping on held-out items, curves |
| ``clip_lora`` | the optional second phase: a peft LoRA on the CLIP's image tower, saved in the model folder |
| ``metrics`` | accuracy (ties half), log-loss, calibration error, Bayes-optimal accuracy |
| ``evaluation`` | ``evaluate_reward(config, progress)``: against group-agnostic, CLIP and Bayes |
| ``ceiling`` | the attribute-reader ceiling: the exact hidden utilities over attributes read from the image features (or the labels) |
| ``scoring`` | ``load_scorer`` / ``score_images``: what workers call (with the model's CLIP LoRA, if any) |
| ``synthetic`` | a synthetic catalog and feature source for tests and demos |
| ``explanation`` | counterfactual attribute effects on one image's reward per group (``genshop explain``) |

Score scale: a reward is a logit. Softmax over the rewards of images shown together gives
choice probabilities; a difference of two rewards is a log-odds (Bradley–Terry). Compare
rewards within one (brief, group) only.
"""

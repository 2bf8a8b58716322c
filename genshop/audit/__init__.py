"""Bias audits: what the reward model and the (tuned) generator favour for each customer group.

| module | job |
| --- | --- |
| ``shares`` | shares of attribute values with Wilson intervals, against the catalog's; group disparities (Newcombe) |
| ``report`` | the ``AuditReport`` schema, its chart (PNG), the latest audit on disk |
| ``reward_audit`` | ``audit_reward(config, progress)``: the reward's top-scored catalog items per group |
| ``generator_audit`` | ``audit_generator(config, progress)``: each group's generated images, read by the understanding heads |

Uses ``reward/`` and ``genshop.understanding``; only the faces (CLI, API) import it.
"""

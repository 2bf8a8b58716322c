"""A/B experiments on generated listings: export, results import, readout and simulation.

``manifest`` holds the shared schemas (arms, listings, the manifest) and the salted-hash
arm assignment; ``export`` writes an experiment folder; ``results`` validates and imports
a shop's funnel counts and turns them into preference data; ``readout`` reports CTR/CVR
and uplifts; ``simulation`` produces results from the simulator's groups, so the loop runs
offline. Nothing here imports torch.
"""

"""GenShop: generative design service for e-commerce.

Core layer (imports neither ``reward`` nor ``workers``): briefs, store, presets and
pipelines, generation, and the brief lifecycle shared by the CLI, workers and API.
"""

__version__ = "0.1.0"

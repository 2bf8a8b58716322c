"""The attribute reward: a conditional logit fitted on clicks recovers the simulated taste,
reloads as saved, scores in expectation over a reader's posteriors, and refuses bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from genshop.settings import REPO_ROOT
from reward.attribute_reward import AttributeReward, expected_utilities, fit_attribute_reward, is_attribute_reward
from reward.impressions import write_impressions
from reward.simulator import SimulationConfig, catalog_attributes, item_utilities, load_simulator_spec, simulate_impressions
from reward.synthetic import write_synthetic_catalog
from tests.conftest import invoke_cli

GROUPS = REPO_ROOT / "configs" / "groups.yaml"


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    root = tmp_path_factory.mktemp("attribute-reward")
    catalog = write_synthetic_catalog(root / "catalog.parquet", 400, seed=3)
    frame, _ = simulate_impressions(SimulationConfig(catalog=[catalog], groups=GROUPS, n=20_000, k=4, seed=5))
    return catalog, frame


def test_the_fit_recovers_each_groups_simulated_taste_and_reloads_as_saved(clicks, tmp_path):
    catalog, frame = clicks
    items = catalog_attributes([catalog])
    reward = fit_attribute_reward(frame, items, steps=300)
    spec = load_simulator_spec(GROUPS)
    truth, learned = item_utilities(spec, items), reward.utilities(items)
    assert reward.config.groups == list(spec.groups) and reward.config.impressions == 20_000
    for g, group in enumerate(spec.groups):
        assert spearmanr(truth[g], learned[g]).statistic > 0.85, group  # the taste, from clicks alone
    other = [spearmanr(truth[g], learned[(g + 1) % 4]).statistic for g in range(4)]
    assert max(other) < 0.6  # and each group's own: another group's fit does not explain it
    assert reward.brief_colour > 0.5  # the simulator's shared bonus for the colour the brief names (1.5 / 0.8)

    saved = reward.save_pretrained(tmp_path / "reward")
    assert is_attribute_reward(saved) and not is_attribute_reward(tmp_path)
    reloaded = AttributeReward.from_pretrained(saved)
    assert reloaded.config == reward.config
    np.testing.assert_allclose(reloaded.utilities(items), learned, rtol=1e-5, atol=1e-5)  # float32 on disk


def test_expected_utilities_are_the_sum_over_the_posterior_grid():
    leaves, colours = ["Kurtas", "Jeans"], ["Red", "Blue", "Black"]
    parents = {"Kurtas": ("Apparel", "Topwear"), "Jeans": ("Apparel", "Bottomwear")}
    table = {("Kurtas", "Red"): 2.0, ("Jeans", "Blue"): 1.0, ("Jeans", "Black"): -1.0}

    def utilities(items: pd.DataFrame) -> np.ndarray:  # two groups: the table, and the table plus a Women's bonus
        base = np.array([table.get((a, c), 0.0) for a, c in zip(items["article_type"], items["colour"])])
        return np.stack([base, base + 0.5 * (items["gender"] == "Women").to_numpy()])

    leaf = np.array([[0.7, 0.3], [0.1, 0.9]])
    colour = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    got = expected_utilities(utilities, leaf, colour, leaves, parents, colours, usage="Ethnic", gender="Women")
    for n in range(2):
        want = sum(leaf[n, i] * colour[n, j] * table.get((a, c), 0.0)
                   for i, a in enumerate(leaves) for j, c in enumerate(colours))
        assert got[0, n] == pytest.approx(want)
        assert got[1, n] == pytest.approx(want + 0.5)


def test_fit_attributes_command_writes_the_reward_and_refuses_unknown_products(clicks, tmp_path, env):
    catalog, frame = clicks
    impressions = write_impressions(frame.iloc[:3000], tmp_path / "clicks.parquet")
    out = tmp_path / "reward"
    result = invoke_cli(["reward", "fit-attributes", str(impressions), "--catalog", str(catalog), "--out", str(out),
                         "--steps", "20", "--reader", "zero-shot", "--brief-article-type", "read"], env)
    assert result.returncode == 0, result.stderr
    config = AttributeReward.from_pretrained(out).config
    assert config.reader == "zero-shot" and config.brief_article_type == "read" and config.impressions == 3000

    stranger = frame.iloc[:10].copy()
    stranger.at[stranger.index[0], "items"] = ["no-such-product", *stranger.iloc[0]["items"][1:]]
    bad = write_impressions(stranger, tmp_path / "stranger.parquet")
    refused = invoke_cli(["reward", "fit-attributes", str(bad), "--catalog", str(catalog), "--out",
                          str(tmp_path / "refused")], env)
    assert refused.returncode == 2 and "no-such-product" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_images_are_scored_through_a_real_reader_with_the_briefs_article_type_fixed_or_read(clicks, tmp_path,
                                                                                            open_clip_dir):
    from PIL import Image

    from genshop.embedding import EmbeddingConfig
    from genshop.enrichment import EnrichConfig, load_enricher
    from genshop.understanding.categorize import HIERARCHY, leaf_log_posterior
    from reward.attribute_reward import image_scorer

    catalog, frame = clicks
    fixed = fit_attribute_reward(frame, catalog_attributes([catalog]), steps=50)
    read = AttributeReward(fixed.config.model_copy(update={"brief_article_type": "read"}), fixed.weights,
                           fixed.no_choice, fixed.brief_colour)
    enricher = load_enricher(EnrichConfig(embedding=EmbeddingConfig.for_directory(open_clip_dir),
                                          index_dir=tmp_path / "index"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)) for _ in range(3)]
    brief = {"usage": "Casual", "gender": "Women", "article_type": "Jeans"}
    as_jeans = image_scorer(fixed, enricher)(images, ["A", "B"], **brief)
    as_read = image_scorer(read, enricher)(images, ["A", "B"], **brief)

    # fixed: every image is a pair of women's casual jeans; only its colour is read
    colour = np.exp(enricher.classifier.log_posteriors(enricher.embedder.embed_images(images))["colour"])
    colours = enricher.classifier.labels["colour"]
    article = next(a for a in enricher.taxonomy.article_types if a.name == "Jeans")
    rows = pd.DataFrame([{"article_type": "Jeans", "sub_category": article.sub_category,
                          "master_category": article.master_category, "colour": c, **brief} for c in colours])
    for g, group in enumerate(["A", "B"]):
        want = colour @ fixed.utilities(rows)[fixed.config.groups.index(group)]
        np.testing.assert_allclose(as_jeans[group], want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(as_read["A"], as_jeans["A"])  # read: the type is read from the image too
    surely_jeans = AttributeReward(fixed.config.model_copy(update={"on_brief_weight": 2.0}), fixed.weights,
                                   fixed.no_choice, fixed.brief_colour)
    log_leaf = leaf_log_posterior(enricher.classifier.log_posteriors(enricher.embedder.embed_images(images)),
                                  enricher.taxonomy, enricher.classifier.temperatures.get(HIERARCHY, 1.0))
    jeans = enricher.taxonomy.labels("article_type").index("Jeans")
    np.testing.assert_allclose(image_scorer(surely_jeans, enricher)(images, ["A"], **brief)["A"],
                               np.array(as_jeans["A"]) + 2.0 * log_leaf[:, jeans], rtol=1e-6, atol=1e-6)
    no_type = {"usage": "Casual", "gender": "Women"}  # a brief without a type: both read it
    np.testing.assert_allclose(image_scorer(fixed, enricher)(images, ["A"], **no_type)["A"],
                               image_scorer(read, enricher)(images, ["A"], **no_type)["A"])
    with pytest.raises(ValueError, match="knows no group"):
        image_scorer(fixed, enricher)(images, ["Z"])


def test_best_of_n_keeps_each_variants_top_by_an_attribute_reward(clicks, env, tmp_path, open_clip_dir, monkeypatch):
    from genshop.briefs import parse_brief, resolve_brief
    from genshop.enrichment import enrich_config_from_settings, load_enricher
    from genshop.generation import generate_batch, reward_scorer
    from genshop.pipelines import load_pipeline
    from genshop.presets import load_preset
    from genshop.settings import get_settings
    from reward.attribute_reward import image_scorer
    from reward.scoring import load_image_reward

    catalog, frame = clicks
    reward = fit_attribute_reward(frame, catalog_attributes([catalog]), steps=50, reader="zero-shot")
    folder = reward.save_pretrained(tmp_path / "attribute-reward")
    monkeypatch.setenv("GENSHOP_EMBEDDING_MODEL", str(open_clip_dir))
    monkeypatch.setenv("GENSHOP_UNDERSTANDING", "off")
    monkeypatch.setenv("GENSHOP_BEST_OF_REWARD", str(folder))
    get_settings.cache_clear()
    assert get_settings().best_of_reward == folder.resolve()
    assert load_image_reward(folder).groups == tuple(reward.config.groups)
    scorer = reward_scorer(get_settings().best_of_reward)
    read = image_scorer(reward, load_enricher(enrich_config_from_settings(get_settings())))
    brief = resolve_brief(parse_brief({"title": "Jeans", "article_type": "Jeans", "usage": "Casual",
                                       "gender": "Women", "variants": 3, "best_of": 3, "seed": 2, "steps": 2,
                                       "groups": ["A", "Z"]}), load_preset("tiny-random"))
    kept = generate_batch(load_pipeline("tiny-random"), brief, [0, 1], scorer=scorer)
    fields = {"usage": "Casual", "gender": "Women", "article_type": "Jeans"}
    for generated, group in zip(kept, ["A", "Z"]):
        record = generated.best_of
        assert record["group"] == group and record["kept"] == int(np.argmax(record["scores"]))
        utilities = read([generated.image], reward.config.groups, **fields)
        # a known group: its utility; one the reward does not know: the mean of its groups' (the population)
        want = utilities["A"][0] if group == "A" else np.mean([utilities[g][0] for g in reward.config.groups])
        assert want == pytest.approx(max(record["scores"]), abs=1e-4)

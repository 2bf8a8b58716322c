"""Catalog understanding: taxonomy as data, hierarchical categorization, attributes, calibration, top-tuning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from genshop.metrics import expected_calibration_error
from genshop.understanding.categorize import (
    HIERARCHY,
    LinearHeads,
    calibrate,
    fit_linear_heads,
    fit_temperature,
    leaf_log_posterior,
    log_softmax,
    understand,
)
from genshop.understanding.taxonomy import load_taxonomy, save_taxonomy, taxonomy_from_catalog

ROWS = [  # (master, sub, article, colour, usage, gender, count)
    ("Apparel", "Topwear", "Tshirts", "Black", "Casual", "Men", 40),
    ("Apparel", "Topwear", "Kurtas", "Red", "Ethnic", "Women", 30),
    ("Apparel", "Bottomwear", "Jeans", "Blue", "Casual", "Men", 20),
    ("Accessories", "Wallets", "Wallets", "Brown", "Casual", "Men", 10),
    ("Personal Care", "Fragrance", "Perfume and Body Mist", "Black", "Casual", "Unknown", 10),
]


def catalog_frame() -> pd.DataFrame:
    rows = []
    for master, sub, article, colour, usage, gender, count in ROWS:
        rows += [{"master_category": master, "sub_category": sub, "article_type": article, "colour": colour,
                  "usage": usage, "gender": gender}] * count
    rows.append({"master_category": "Apparel", "sub_category": "Wallets", "article_type": "Tshirts",  # a mislabel
                 "colour": "White", "usage": "Sports", "gender": "Women"})
    return pd.DataFrame(rows)


@pytest.fixture()
def taxonomy(tmp_path):
    path = save_taxonomy(taxonomy_from_catalog(catalog_frame(), source="test"), tmp_path / "taxonomy.yaml")
    return load_taxonomy(path)


def test_taxonomy_is_built_from_a_catalog_and_round_trips_as_yaml(taxonomy):
    tshirts = next(a for a in taxonomy.article_types if a.name == "Tshirts")
    assert (tshirts.sub_category, tshirts.master_category, tshirts.count) == ("Topwear", "Apparel", 41)
    assert taxonomy.labels("master_category") == ["Accessories", "Apparel", "Personal Care"]
    assert taxonomy.counts("sub_category") == {"Topwear": 71, "Bottomwear": 20, "Wallets": 10, "Fragrance": 10}
    gender = taxonomy.family("gender")
    assert "Unknown" not in gender.values
    assert not gender.applies("Personal Care") and gender.applies("Apparel")  # mostly unknown there
    assert not taxonomy.family("usage").applies("Accessories")  # a single value there says nothing


def one_hot_log_posteriors(taxonomy, picks: dict[str, list[str]], sharpness: float = 6.0) -> dict[str, np.ndarray]:
    """Log-posteriors that favour the given label of each output for each item."""
    from genshop.understanding.categorize import output_labels

    out = {}
    for name, labels in output_labels(taxonomy).items():
        if name in picks:
            logits = np.array([[sharpness if label == pick else 0.0 for label in labels] for pick in picks[name]])
            out[name] = log_softmax(logits)
    return out


def test_hierarchy_gives_a_real_path_and_abstains_top_down(taxonomy):
    picks = {"master_category": ["Apparel", "Accessories"], "sub_category": ["Topwear", "Topwear"],
             "article_type": ["Kurtas", "Wallets"], "colour": ["Red", "Brown"], "usage": ["Ethnic", "Casual"],
             "gender": ["Women", "Men"]}
    first, second = understand(one_hot_log_posteriors(taxonomy, picks), taxonomy, abstain_below=0.5)
    assert (first.master_category.label, first.sub_category.label, first.article_type.label) == \
        ("Apparel", "Topwear", "Kurtas")
    assert first.master_category.confidence >= first.sub_category.confidence >= first.article_type.confidence > 0.5
    assert first.attributes["colour"].label == "Red" and first.attributes["gender"].label == "Women"
    assert first.title == "Women Red Ethnic Kurtas"
    from genshop.understanding.categorize import listing_title
    assert listing_title("{gender} {colour} {usage} {article_type}",
                  {"gender": "Men", "colour": "Black", "usage": "Casual", "article_type": "Casual Shoes"}) == \
        "Men Black Casual Shoes"
    # the levels disagree (Accessories / Topwear / Wallets): the path stays consistent, confidence drops
    leaf = second.article_type.label or "?"
    parents = {a.name: (a.master_category, a.sub_category) for a in taxonomy.article_types}
    assert second.article_type.abstained or parents[leaf] == (second.master_category.label, second.sub_category.label)
    assert "usage" not in second.attributes or second.master_category.label != "Accessories"

    unsure = understand(one_hot_log_posteriors(taxonomy, {k: v[:1] for k, v in picks.items()}, sharpness=0.1),
                        taxonomy, abstain_below=0.8)[0]
    # three of five leaves are Apparel: the flat posteriors give it about 0.65, below the threshold
    assert unsure.master_category.abstained and unsure.article_type.abstained and unsure.article_type.label is None
    assert 0.5 < unsure.master_category.confidence < 0.8


def test_leaf_posterior_is_a_distribution_over_article_types(taxonomy):
    picks = {"master_category": ["Apparel"], "sub_category": ["Bottomwear"], "article_type": ["Jeans"]}
    joint = np.exp(leaf_log_posterior(one_hot_log_posteriors(taxonomy, picks), taxonomy))
    assert joint.shape == (1, len(taxonomy.article_types))
    assert joint.sum() == pytest.approx(1.0)
    assert taxonomy.labels("article_type")[int(joint.argmax())] == "Jeans"


def test_temperature_fit_recovers_the_generating_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 5)) * 3
    probabilities = np.exp(log_softmax(logits / 2.0))
    targets = np.array([rng.choice(5, p=p) for p in probabilities])
    assert fit_temperature(lambda t: log_softmax(logits / t), targets) == pytest.approx(2.0, rel=0.1)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    assert expected_calibration_error(confidence, correct) < 0.03
    assert expected_calibration_error(np.ones_like(confidence), correct) > 0.3


def test_linear_heads_fit_calibrate_save_and_load(taxonomy, tmp_path):
    rng = np.random.default_rng(0)
    frame = catalog_frame()
    centres = {article: rng.normal(size=16) for article in frame["article_type"].unique()}
    features = np.stack([centres[a] + 0.3 * rng.normal(size=16) for a in frame["article_type"]])
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    labelled = {name: list(frame[name]) for name in ("master_category", "sub_category", "article_type", "colour")}
    heads = fit_linear_heads(features, labelled, taxonomy)
    temperatures = calibrate(heads, features, labelled)
    assert set(temperatures) == {"master_category", "sub_category", "article_type", "colour", HIERARCHY}
    items = understand(heads.log_posteriors(features), taxonomy, hierarchy_temperature=temperatures[HIERARCHY])
    predicted = [item.article_type.label for item in items]
    assert np.mean(np.array(predicted) == frame["article_type"].to_numpy()) > 0.95
    assert "gender" not in items[0].attributes  # no head was fitted for it

    loaded = LinearHeads.from_pretrained(heads.save_pretrained(tmp_path / "heads"), taxonomy)
    assert loaded.temperatures == heads.temperatures
    for name, values in heads.log_posteriors(features).items():
        np.testing.assert_allclose(loaded.log_posteriors(features)[name], values)
    other = taxonomy.model_copy(update={"article_types": taxonomy.article_types[:-1]})
    with pytest.raises(ValueError, match="another taxonomy"):
        LinearHeads.from_pretrained(tmp_path / "heads", other)


def test_product_vector_fuses_modalities_and_beats_the_image_alone_on_category_retrieval(tmp_path):
    from genshop.understanding.fusion import ProductFusion, attribute_text, category_retrieval_map, fit_fusion

    rng = np.random.default_rng(0)
    dim, n_classes, n = 24, 6, 1200
    classes = rng.normal(size=(n_classes, dim))
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    labels = rng.integers(n_classes, size=n)
    noise = lambda scale: scale * rng.normal(size=(n, dim))  # noqa: E731
    features = {"image": classes[labels] + noise(1.2), "title": classes[labels] + noise(0.5),
                "attributes": noise(1.0)}  # attributes say nothing about the category here
    names = [f"c{i}" for i in range(n_classes)]

    untrained = ProductFusion(dim).fuse(features)
    plain_sum = sum(v / np.linalg.norm(v, axis=1, keepdims=True) for v in features.values())
    np.testing.assert_allclose(untrained, plain_sum / np.linalg.norm(plain_sum, axis=1, keepdims=True), atol=1e-5)

    fusion = fit_fusion({m: v[:900] for m, v in features.items()}, labels[:900], classes, logit_scale=20.0, steps=200)
    held_out = {m: v[900:] for m, v in features.items()}
    label_names = np.array(names, dtype=object)[labels[900:]]
    image_only = category_retrieval_map(held_out["image"] / np.linalg.norm(held_out["image"], axis=1, keepdims=True),
                                        label_names, classes, names)
    fused = category_retrieval_map(fusion.fuse(held_out), label_names, classes, names)
    untrained_map = category_retrieval_map(ProductFusion(dim).fuse(held_out), label_names, classes, names)
    assert fused > untrained_map and fused > image_only + 0.1
    without_title = category_retrieval_map(fusion.fuse({"image": held_out["image"]}), label_names, classes, names)
    assert without_title > 0.2  # still usable for an item with no title

    loaded = ProductFusion.from_pretrained(fusion.save_pretrained(tmp_path / "fusion"))
    np.testing.assert_allclose(loaded.fuse(held_out), fusion.fuse(held_out), atol=1e-6)
    assert attribute_text({"gender": "Women", "colour": "Red", "usage": ""}) == "Red, Women"


def test_category_retrieval_map_on_a_worked_example():
    from genshop.understanding.fusion import category_retrieval_map

    classes = np.eye(2)
    products = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    # "a": relevant items 0 and 2 ranked 1st and 3rd → AP (1/1 + 2/3) / 2; "b": items 1, 3 ranked 3rd, 1st for b
    labels = np.array(["a", "b", "a", "b"], dtype=object)
    expected_a = (1 + 2 / 3) / 2
    expected_b = (1 / 1 + 2 / 3) / 2  # b's order: 3 (0.0,1.0), 2, 1, 0 → relevant at ranks 1 and 3
    assert category_retrieval_map(products, labels, classes, ["a", "b"]) == pytest.approx((expected_a + expected_b) / 2)

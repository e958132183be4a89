"""Sweep files and the ASHA decision: pure functions, plain data."""

import math

import pytest

from realfake.errors import SpecError
from realfake.pruning import should_continue
from realfake.sweeps import EarlyTerminate, expand, load_spec, parse_spec


def spec(**overrides):
    data = {
        "name": "t",
        "method": "grid",
        "parameters": {"lr": {"values": [1e-3, 1e-4]}, "batch_size": {"values": [16, 32, 64]}},
        "base": {"backbone": "mobilenet_v2", "epochs": 4},
    }
    return data | overrides


def test_grid_expands_to_every_combination_over_the_base():
    variants = expand(parse_spec(spec()))
    assert len(variants) == 6
    assert {(v["lr"], v["batch_size"]) for v in variants} == {(a, b) for a in (1e-3, 1e-4) for b in (16, 32, 64)}
    assert all(v["backbone"] == "mobilenet_v2" and v["epochs"] == 4 for v in variants)
    assert all(v["selection_metric"] == "accuracy" for v in variants)


def test_the_sweep_metric_becomes_each_runs_selection_metric():
    variants = expand(parse_spec(spec(metric={"name": "loss", "goal": "minimize"})))
    assert {v["selection_metric"] for v in variants} == {"loss"}


def test_the_metric_s_goal_follows_its_name_and_a_contradiction_is_refused():
    assert parse_spec(spec(metric={"name": "loss"})).metric.goal == "minimize"
    assert parse_spec(spec(metric={"name": "roc_auc"})).metric.goal == "maximize"
    with pytest.raises(SpecError, match="metric: loss is to minimize, not maximize"):
        parse_spec(spec(metric={"name": "loss", "goal": "maximize"}))  # `best` would be the worst run
    with pytest.raises(SpecError, match="metric: f1 is to maximize, not minimize"):
        parse_spec(spec(metric={"name": "f1", "goal": "minimize"}))
    for where in ({"base": {"selection_metric": "loss"}}, {"parameters": {"selection_metric": {"values": ["f1"]}}}):
        with pytest.raises(SpecError, match="differs from metric.name accuracy"):
            parse_spec(spec(**where))
    assert parse_spec(spec(base={"selection_metric": "accuracy"}))  # the same as the metric: fine


def test_random_draws_are_reproducible_from_the_seed_and_respect_distributions():
    random_spec = spec(
        method="random", max_runs=50, seed=7,
        parameters={
            "lr": {"min": 1e-5, "max": 1e-2, "distribution": "log_uniform"},
            "batch_size": {"min": 8, "max": 64, "distribution": "int_uniform"},
            "dropout": {"min": 0.1, "max": 0.6},
            "optimizer": {"values": ["adam", "sgd"]},
        },
    )
    first, again = expand(parse_spec(random_spec)), expand(parse_spec(random_spec))
    assert first == again and len(first) == 50
    assert first != expand(parse_spec(random_spec | {"seed": 8}))
    assert all(1e-5 <= v["lr"] <= 1e-2 and isinstance(v["batch_size"], int) and 8 <= v["batch_size"] <= 64 for v in first)
    assert all(0.1 <= v["dropout"] <= 0.6 and v["optimizer"] in {"adam", "sgd"} for v in first)
    # log-uniform: about half the draws below the geometric midpoint
    below = sum(v["lr"] < math.sqrt(1e-5 * 1e-2) for v in first)
    assert 15 <= below <= 35


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"colour": 1}, "colour: unknown key"),
        ({"metric": {"name": "speed"}}, "metric.name"),
        ({"method": "bayes"}, "method"),
        ({"method": "random"}, "random sweeps need max_runs"),
        ({"parameters": {"lr": {"min": 1e-4, "max": 1e-2}}}, "grid sweeps need `values` lists; lr"),
        ({"parameters": {"lr": {"values": []}}}, "parameters.lr.values"),
        ({"parameters": {"lr": {"min": 1, "max": 0, "distribution": "uniform"}}, "method": "random", "max_runs": 2},
         "min 1.0 is larger than max 0.0"),
        ({"parameters": {"learning_rate": {"values": [1]}}}, "parameters.learning_rate: unknown training parameter"),
        ({"base": {"lerning_rate": 0.1}}, "base.lerning_rate: unknown training parameter 'lerning_rate'"),
        ({"base": {"epochs": "ten"}}, "variant 0"),
        ({"base": {"image_size": 300, "resize": 256}}, "image_size 300 is larger than resize 256"),
        ({"split": {"val": 0.6, "test": 0.5}}, "val + test must leave some data"),
        ({"split": {"val": 0.1, "folds": 5}}, "give either val or folds"),
        ({"split": {"folds": 1}}, "split.folds"),
        ({"early_terminate": {"type": "hyperband"}}, "early_terminate.type"),
        ({"name": ""}, "name"),
        ({"base": {"device": "gpu"}}, "device 'gpu': expected auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_validation_names_the_field(overrides, message):
    with pytest.raises(SpecError) as info:
        parse_spec(spec(**overrides))
    assert message in str(info.value)


def test_a_file_that_is_not_yaml_or_not_a_mapping(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(tmp_path / "list.yaml")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_asha_rungs():
    assert EarlyTerminate(min_epochs=1, reduction_factor=3).rungs(10) == [1, 3, 9]
    assert EarlyTerminate(min_epochs=2, reduction_factor=2).rungs(10) == [2, 4, 8]
    assert EarlyTerminate(min_epochs=5, reduction_factor=2).rungs(5) == []


def test_asha_keeps_the_top_third_and_at_least_the_best():
    rung = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]  # six runs at the rung: two go on
    assert should_continue(0.9, rung, 3) and should_continue(0.8, rung, 3)
    assert not should_continue(0.7, rung, 3) and not should_continue(0.4, rung, 3)
    assert should_continue(0.5, [0.5], 3)  # alone at the rung: the best so far
    assert not should_continue(0.5, [0.5, 0.6], 3)  # two: only the best goes on
    assert should_continue(0.6, [0.5, 0.6], 3)


def test_asha_when_lower_is_better():
    losses = [0.1, 0.2, 0.3, 0.4]
    assert should_continue(0.1, losses, 2, higher_is_better=False)
    assert should_continue(0.2, losses, 2, higher_is_better=False)
    assert not should_continue(0.3, losses, 2, higher_is_better=False)


@pytest.mark.parametrize("name", ["seed.yaml", "sweep.yaml", "best.yaml", "best-448.yaml", "best-20ep.yaml", "best-cv8.yaml"])
def test_the_example_sweep_files_are_valid(name):
    from tests.conftest import REPO

    spec = load_spec(REPO / "examples" / name)
    variants = expand(spec)
    assert variants and all(v["backbone"] in {"resnet50", "mobilenet_v2"} for v in variants)
    if name == "seed.yaml":
        (seed,) = variants
        assert (seed["backbone"], seed["hidden"], seed["dropout"], seed["batch_size"], seed["epochs"]) == (
            "resnet50", 512, 0.5, 32, 10)
        assert (seed["resize"], seed["image_size"], seed["rotation"], seed["optimizer"]) == (256, 224, 15, "adam")
    if name == "best-cv8.yaml":  # best.yaml, cross-validated over 8 folds
        (best,) = expand(load_spec(REPO / "examples" / "best.yaml"))
        assert variants == [best] and spec.split.folds == 8 and spec.split.test == 0.2
